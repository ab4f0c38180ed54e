"""`dcfeat info`: what a feature store holds, as a table."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from dcfeat.errors import human_bytes
from dcfeat.store import SplitInfo


def splits_table(store: Path, splits: list[SplitInfo]):
    """`dcfeat info`'s table: one row per split with what identifies and what is wrong with it."""
    table = Table(title=str(store))
    for col in ("split", "rows", "dim", "dtype", "model", "pooling", "crop", "complete", "disk", "tokens",
                "failures", "problems"):
        table.add_column(col, justify="right" if col in ("rows", "dim", "disk", "failures") else "left")
    for s in splits:
        model = str(s.attrs.get("model", "?")) + (" (random init)" if s.attrs.get("backbone_random_init") else "")
        tokens = (f"K={s.cache_tokens}, {human_bytes(s.token_bytes_per_image)}/image"
                  if s.cache_tokens else "-")
        table.add_row(s.name, f"{s.rows:,}", str(s.dim), s.dtype, model, str(s.attrs.get("pooling", "?")),
                      f"{s.attrs.get('image_size', '?')} {s.attrs['crop']}", "yes" if s.complete else "no",
                      human_bytes(s.bytes_on_disk), tokens, str(s.failures), "; ".join(s.problems) or "-")
    return table


def problems_table(problems) -> Table:
    """`dcfeat info --verify`'s findings: where, what, and what to do."""
    table = Table(title="problems")
    for col in ("split", "where", "problem", "what to do"):
        table.add_column(col, overflow="fold")
    for p in problems:
        table.add_row(p.split, p.where, p.what if p.serious else f"{p.what} (harmless)", p.fix)
    return table
