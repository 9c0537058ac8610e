"""What the bench tools' command lines share: comma-separated lists, and `python -m` entry.

Every tool is a subcommand of `cxrlite bench` (cxrlite.commands.bench); `python -m
cxrlite.bench.<module>` runs the same subcommand through the `cxrlite` entry point, so both ways
parse, log and report errors alike.
"""

from __future__ import annotations

import sys

import click


def int_list(text: str, option: str) -> list[int]:
    """ "1,2,4" as [1, 2, 4]; a usage error naming `option` otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"comma-separated integers expected, got {text!r}", param_hint=option
        ) from None


def names(text: str | None) -> tuple[str, ...] | None:
    """ "a, b" as ("a", "b"); None stays None."""
    if text is None:
        return None
    return tuple(v.strip() for v in text.split(",") if v.strip())


def run_subcommand(name: str, argv: list[str] | None = None) -> None:
    """`cxrlite bench NAME ARGV...` (ARGV defaults to this process's arguments)."""
    from cxrlite.cli import main

    args = sys.argv[1:] if argv is None else argv
    main(["bench", name, *args], prog_name="cxrlite")
