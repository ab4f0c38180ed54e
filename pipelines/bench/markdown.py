"""Markdown pieces every BENCHMARKS.md section uses."""

from __future__ import annotations


def table(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def measured(record: dict) -> str:
    return f", measured {record['date']}" if "date" in record else ", date not recorded"
