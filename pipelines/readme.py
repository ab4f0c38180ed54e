"""Rewrite docs/cli.md, the CLI reference, from the commands' own --help (a test checks it is current).

Inputs: docs/cli.md and the installed dcfeat. Output: docs/cli.md, the part between
the `cli-reference` markers replaced. Run: `python pipelines/readme.py`.
"""

import re
from pathlib import Path

import click

from dcfeat.cli import cli

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def reference() -> str:
    """The CLI reference: every command's --help, at a fixed width."""
    parts = []
    for name, command in cli.commands.items():
        # The group's help names (-h too): click caches a command's help option the first time it
        # is built, so a reference built with other names would depend on what ran before it.
        ctx = click.Context(command, info_name=f"dcfeat {name}", terminal_width=100, max_content_width=100,
                            help_option_names=cli.context_settings["help_option_names"])
        parts.append(f"## `dcfeat {name}`\n\n```\n{command.get_help(ctx)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    text = REFERENCE.read_text()
    new = re.sub(f"{START}.*{END}", lambda _: f"{START}\n{reference()}{END}", text, flags=re.S)
    REFERENCE.write_text(new)
    print("docs/cli.md " + ("rewritten" if new != text else "already current"))
