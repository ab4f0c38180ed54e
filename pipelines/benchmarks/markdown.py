"""Markdown pieces every BENCHMARKS.md section uses."""

from __future__ import annotations


def table(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def command(name: str) -> str:
    """The command that measures benchmark `name`, as captions name it."""
    return f"`python -m pipelines.benchmarks run {name}`"


def not_measured(name: str) -> str:
    return f"Not measured yet: run {command(name)}."


def measured(record: dict) -> str:
    return f", measured {record['date']}" if record.get("date") else ", date not recorded"


def machine_load(record: dict) -> str:
    """The shared machine's 1-minute load average around a timed record (its header's), as captions say it;
    nothing where the record holds none."""
    load = record.get("load") or {}
    if "before" not in load:
        return ""
    after = f", {load['after']:.1f} after" if "after" in load else ""
    return f", the machine shared (1-minute load average {load['before']:.1f} before{after})"


def recall_cells(m: dict) -> list[str]:
    """LR@1/5/10/20 in % and the median error of one method's report entry."""
    return [*(f"{100 * m['recall'][k]:.1f}" for k in ("1", "5", "10", "20")), f"{m['median_error_m']:.1f} m"]
