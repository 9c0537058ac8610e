"""`cxrlite eval`: CheXbench-style evaluation of a checkpoint or each variant of a bundle
(cxrlite.eval.chexbench runs it, cxrlite.eval.results lays out the results)."""

from __future__ import annotations

from pathlib import Path

import click


# fmt: off
@click.command("eval")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_dir", type=click.Path(exists=True, path_type=Path), required=True,
              help="Dataset folder (phantoms, MIMIC-CXR-JPG, CheXpert, IU X-ray, PadChest, JSONL); its test split is used.")
@click.option("--variants", default="all", show_default=True,
              help="Bundle variants to evaluate, comma-separated (torch-fp32 is the reference), or 'all'.")
@click.option("--n", type=click.IntRange(1), default=None, help="Evaluate only the first N test studies.")
@click.option("--bootstrap", type=click.IntRange(0), default=1000, show_default=True, help="Bootstrap resamples for the 95% CIs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the task options and the bootstrap.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=128, show_default=True, help="Longest generated findings.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write eval.json and eval.md here.")
def eval_command(target: Path, data_dir: Path, variants: str, n: int | None, bootstrap: int, seed: int,
                 max_tokens: int, threads: int | None, out: Path | None) -> None:
    """Evaluate TARGET, a checkpoint (PyTorch) or a bundle (each variant, and the PyTorch
    reference when its source checkpoint is present), on the test split of --data: multiple
    choice by option likelihood, findings F1 (14 and 5 labels), ROUGE-L, BLEU, perplexity and
    F1 by sex and age band, each with a bootstrap 95% CI; one comparison table."""
    from rich.console import Console
    from rich.table import Table

    from cxrlite.eval.chexbench import run_eval
    from cxrlite.eval.results import eval_tables, write_eval

    payload = run_eval(target, data_dir, variants=variants, n=n, bootstrap=bootstrap, seed=seed,
                       max_tokens=max_tokens, threads=threads)
    console = Console(width=max(Console().width, 160))
    for title, (header, rows) in eval_tables(payload["results"]).items():
        table = Table(title=title, title_justify="left")
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for name, why in payload["skipped"].items():
        console.print(f"[dim]skipped {name}: {why}[/]")
    if out is not None:
        json_path, md_path = write_eval(payload, out)
        click.echo(f"wrote {json_path}, {md_path}", err=True)
# fmt: on
