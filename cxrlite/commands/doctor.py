"""`cxrlite doctor`."""

from __future__ import annotations

import json

import click

from cxrlite.doctor import run_doctor


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """Print what this machine can run: torch and its devices, onnxruntime providers, TensorRT,
    llama.cpp GPU offload, the GPTQ library, free RAM/VRAM, and what is missing for which feature.
    Exits 0 even when optional parts are missing: they are listed with the command that fixes them."""
    report = run_doctor()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cxrlite doctor", show_lines=False)
    for col in ("", "component", "found", "needed for"):
        table.add_column(col)
    for c in report.checks:
        table.add_row("[green]ok[/]" if c.ok else "[yellow]--[/]", c.name, c.detail, c.needed_for)
    console = Console()
    console.print(table)
    if report.missing:
        console.print("\nTo enable what is missing:")
        for c in report.missing:
            if c.fix:
                console.print(f"  {c.name}: {c.fix}")
