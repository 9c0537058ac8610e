"""`cxrlite train`."""

from __future__ import annotations

import os
from pathlib import Path

import click


def _stage_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give stage numbers separated by commas, e.g. 2,3"
        ) from None


@click.command()
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Dataset folder (phantoms, or a published layout; see `cxrlite data import`).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder: one subfolder per stage. Re-running resumes.",
)
@click.option(
    "--preset",
    default="small",
    show_default=True,
    help="Model shape: tiny, small, vitb16-llama1b, so400m-llama7b.",
)
@click.option(
    "--recipe",
    type=click.Choice(["chexagent", "llava-rad"]),
    default="chexagent",
    show_default=True,
    help="chexagent: 4 stages (LLM, vision, bridger, instructions); llava-rad: projector, then projector + LoRA.",
)
@click.option(
    "--stages", callback=_stage_list, default=None, help="Run only these stages, e.g. 2,3."
)
@click.option(
    "--steps-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiply every stage's step count (0.5 = a shorter schedule).",
)
@click.option(
    "--lora", is_flag=True, help="Instruction tuning through LoRA adapters (merged afterwards)."
)
@click.option(
    "--vision-init",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Local folder of a pretrained SigLIP/CLIP vision model (nothing is downloaded).",
)
@click.option(
    "--llm-init",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Local folder of a pretrained Llama-family model and its tokenizer.",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best available).")
@click.option(
    "--max-train",
    type=click.IntRange(1),
    default=None,
    help="Use at most this many training studies.",
)
@click.option(
    "--max-eval",
    type=click.IntRange(1),
    default=200,
    show_default=True,
    help="Held-out studies used for validation and the final quality figures.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def train(
    data_dir: Path,
    out: Path,
    preset: str,
    recipe: str,
    stages: list[int] | None,
    steps_scale: float,
    lora: bool,
    vision_init: str | None,
    llm_init: str | None,
    device: str | None,
    max_train: int | None,
    max_eval: int,
    seed: int,
) -> None:
    """Train the model with the four-stage recipe; each stage starts from the previous one's
    checkpoint (OUT/stageN-NAME/checkpoint). Under torchrun or `accelerate launch` it trains with DDP.

    \b
    Example:
      cxrlite train --preset small --data phantoms/ --out runs/small
    """
    from cxrlite.train.run import run_recipe

    results = run_recipe(
        data_dir,
        out,
        preset=preset,
        recipe=recipe,
        stages=stages,
        steps_scale=steps_scale,
        lora=lora,
        vision_init=vision_init,
        llm_init=llm_init,
        device=device,
        seed=seed,
        max_train=max_train,
        max_eval=max_eval,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 alone reports
    for name, r in results.items():
        val = r.get("eval", {}).get("val_loss")
        click.echo(
            f"{name}: {r['steps']} steps, loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}"
            + (f", val loss {val:.3f}" if val is not None else "")
            + f", {r['wall_time_s']:.0f} s"
        )
        quality = r.get("quality")
        if quality:
            f1 = quality["findings_f1"]
            click.echo(
                f"held-out findings F1 ({quality['n_test']} studies): macro {f1['macro_f1']:.3f}, "
                f"micro {f1['micro_f1']:.3f}"
            )
            for obs, row in f1["per_observation"].items():
                click.echo(f"  {obs}: F1 {row['f1']:.3f}")
            for task, row in quality["multiple_choice"].items():
                click.echo(f"  {task}: accuracy {row['accuracy']:.3f} (n={row['n']})")
    click.echo(
        f"final checkpoint: {out / list(results)[-1] / 'checkpoint'}"
        if results
        else "nothing to run"
    )
