"""BENCHMARKS.md from the recorded results in pipelines/results/ (no measuring here).

Each benchmark's `render` turns its records into a caption and a table; the longer prose lives in
BENCHMARKS.template.md, whose `$name` placeholders they fill. A result without a recorded date says so
instead of taking today's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from string import Template

from pipelines.benchmarks import records

TEMPLATE = Path(__file__).with_name("BENCHMARKS.template.md")
BENCHMARKS_MD = records.ROOT / "BENCHMARKS.md"


def render_all(renders: dict[str, Callable[[list[dict]], str | dict[str, str]]],
               results: Path = records.RESULTS) -> str:
    """BENCHMARKS.md: each benchmark's render on its records, oldest first; a str fills the placeholder named
    after the benchmark, a dict the placeholders it names."""
    sections = {}
    for name, render in renders.items():
        part = render(records.records(name, results))
        sections.update(part if isinstance(part, dict) else {name: part})
    return Template(TEMPLATE.read_text()).substitute(sections).rstrip("\n") + "\n"
