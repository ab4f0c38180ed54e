"""What `dcfeat demo` (and `make demo`) runs: the method end to end on a rendered city.

Inputs: none; the city is rendered under data/demo/images. Outputs under
data/demo/: feats.h5 (+ .labels/, .shards/), runs/<timestamp>/ with
eval/test/{report.json, predictions.parquet, *.png}; the feature city's store and
runs the same way under data/demo/city/. Run: `python pipelines/demo.py`
(extra options are those of `dcfeat demo --help`).
"""

import sys

from dcfeat.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
