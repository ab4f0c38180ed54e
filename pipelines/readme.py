"""Rewrite the README's CLI reference from the commands' own --help (a test checks it is current).

Inputs: README.md and the installed dcfeat. Output: README.md, the part between
the `cli-reference` markers replaced. Run: `python pipelines/readme.py`.
"""

import re
from pathlib import Path

from dcfeat.cli import reference

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"

if __name__ == "__main__":
    text = README.read_text()
    new = re.sub(f"{START}.*{END}", lambda _: f"{START}\n{reference()}{END}", text, flags=re.S)
    README.write_text(new)
    print("README.md CLI reference " + ("rewritten" if new != text else "already current"))
