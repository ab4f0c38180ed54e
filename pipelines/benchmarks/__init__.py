"""Every benchmark of the project, one module each; the package `dcfeat` never imports it.

Run from the repository root: `python -m pipelines.benchmarks list`, `python -m pipelines.benchmarks run NAME
[options]` (measures and records, see `run NAME --help`) and `python -m pipelines.benchmarks render` (rewrites
BENCHMARKS.md from the recorded results in pipelines/results/, measuring nothing).

A benchmark module has `measure(**options) -> dict` (JSON-able; a module that reports row by row takes a
`rows` callback too), `render(records) -> str` (its BENCHMARKS.md section, from its records oldest first; a
dict of template placeholders where it fills several) and `OPTIONS`, the click options of `run NAME`; a module with
`figure(record, path)` also draws its record as a PNG beside it (the record's name, `.png`).
`records` stores the results; `speed`, `quality` and `markdown` are measurement and table pieces the
benchmarks share.
"""

# name → what it measures; each is the module pipelines/benchmarks/<name>.py.
BENCHMARKS = {
    "cpu": "decoding, extraction, training and query speed, and the synthetic city's quality, on this CPU (~15 min)",
    "gpu": "every GPU figure in one run, row by row (for a lent H100/H200)",
    "sweep": "the training defaults swept on the synthetic city",
    "finetune": "tuning the last backbone blocks from cached tokens (~10 min)",
    "fingerprint": "what the backbone fingerprint costs on a ViT-B/14 (~20 s)",
    "scoring": "cosine against group-softmax ranking of cells (~1 min)",
    "crop": "`extract --crop full` against the centre crop (~10 min)",
    "presets": "the two training presets, and dc-paper with one difference at a time set to dcfeat's (~30 min)",
    "negatives": "sampled negatives: step speed at many classes and learning quality",
    "scorer": "`predict --feats` against `evaluate --mode classify`, ms per query side by side (~3 min)",
    "train_speed": "training epoch time of this code against commit 3d83f78, side by side (~10 min)",
    "suite": "`make test` on fresh clones as CI runs it, install included, against commit b151a18 (~20 min)",
    "confidence": "the calibrated confidence against its goals (~3 min)",
    "hybrid": "query speed at a 1.25 M-row database, and exact retrieval against faiss (~15 min)",
    "streamed": "streamed training against the same split in memory",
    "database": "the hybrid's search of a database on disk: peak RSS against the file's size (1 M rows: a few min)",
    "scale": "the fused hybrid's query cost from 75 k to 10 M rows on disk, warm and cold; memory check; faiss IVF on disk",
    "cli": "how fast the command line answers (under a minute)",
    "fused": "what the fused hybrid costs beside classification, side by side in one process (~5 min)",
    "worlds": "every quality claim on the synthetic family of cities (~20 min)",
    "serve": "`dcfeat serve` on loopback: throughput, soak and the hostile set (~10 min)",
    "serve_hostile": "`dcfeat serve` under slow and maximal clients (~10 min; run it niced)",
}
