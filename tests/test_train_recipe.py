"""The training recipe on the tiny preset: every stage learns, trains only its parts, and the
stages chain through their checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlite.data.datasets import load_dataset
from cxrlite.data.labels import CORE_FINDINGS, POSITIVE
from cxrlite.eval.evaluation import generate_findings
from cxrlite.eval.labeler import label_report
from cxrlite.imaging.decode import load_image
from cxrlite.imaging.preprocess import PreprocessConfig, preprocess
from cxrlite.model.checkpoint import load, load_weights
from cxrlite.phantoms.generator import generate_phantoms
from cxrlite.train.data import InstructionDataset
from cxrlite.train.recipe import CHEXAGENT, StageDef, plan
from cxrlite.train.run import run_recipe


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    # Seed 4: the held-out test studies have positive core findings, so the F1 check of
    # test_final_stage_reports_quality has positives to count.
    generate_phantoms(out, 48, seed=4, size=64)
    return out


@pytest.fixture(scope="module")
def chexagent_run(phantoms: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    return out, run_recipe(phantoms, out, preset="tiny", progress=False, max_eval=4)


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_weights(run / stage / "checkpoint")


def _same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_every_stage_lowers_its_loss(chexagent_run) -> None:
    _, results = chexagent_run
    assert list(results) == [s.folder for s in CHEXAGENT]
    for name, r in results.items():
        assert r["eval"]["val_loss"] < r["val_loss_before"], (name, r)


def test_each_stage_trains_only_its_parts(chexagent_run) -> None:
    run, _ = chexagent_run
    s0, s1, s2, s3 = (_weights(run, s.folder) for s in CHEXAGENT)
    # stage 1: vision encoder only (the LLM and bridger come unchanged from stage 0)
    assert not _same(s0, s1, "vision.") and _same(s0, s1, "llm.") and _same(s0, s1, "bridger.")
    # stage 2: bridger only
    assert _same(s1, s2, "vision.") and _same(s1, s2, "llm.") and not _same(s1, s2, "bridger.")
    # stage 3: bridger + LLM, and the ViT at a lower rate
    assert not any(_same(s2, s3, part) for part in ("vision.", "llm.", "bridger."))
    # stage 3's report-label head is not part of the checkpoint; the findings head fitted after it is
    assert set(s3) == set(s2) | {"findings_head.linear.weight", "findings_head.linear.bias"}


def _f1(pred: list[bool], truth: list[bool]) -> float:
    tp = sum(p and t for p, t in zip(pred, truth, strict=True))
    wrong = sum(p != t for p, t in zip(pred, truth, strict=True))  # false positives + negatives
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def test_final_stage_reports_quality(chexagent_run, phantoms: Path) -> None:
    """The held-out findings F1 is the one computed here, independently, from the same greedy
    findings of the saved checkpoint on the same test studies."""
    run, results = chexagent_run
    quality = results["stage3-instruction"]["quality"]
    test = [s for s in load_dataset("phantom", phantoms) if s.split == "test"][:4]  # max_eval
    assert quality["n_test"] == len(test) >= 2
    assert any(s.chexpert.get(obs) == POSITIVE for s in test for obs in CORE_FINDINGS)
    model, tokenizer, cfg = load(run / "stage3-instruction" / "checkpoint")
    pre = PreprocessConfig.from_dict(cfg.preprocess)

    def pixels_for(path: str) -> torch.Tensor:  # as the trainer's image store keeps them
        pixels = preprocess(load_image(path).pixels, pre).astype(np.float16)
        return torch.from_numpy(pixels).float()

    generated = generate_findings(model, tokenizer, test, pixels_for)
    assert [e["generated"] for e in quality["examples"]] == generated[:3]
    predicted = [label_report(text) for text in generated]
    reported = quality["findings_f1"]["per_observation"]
    f1 = {}
    for obs in CORE_FINDINGS:
        pred = [p.get(obs) == POSITIVE for p in predicted]
        truth = [s.chexpert.get(obs) == POSITIVE for s in test]
        f1[obs] = _f1(pred, truth)
        assert reported[obs]["f1"] == pytest.approx(f1[obs]), obs
        assert reported[obs]["support"] == sum(truth), obs
    assert quality["findings_f1"]["macro_f1"] == pytest.approx(sum(f1.values()) / len(f1))
    assert "view_classification" in quality["multiple_choice"]
    assert (run / "stage3-instruction" / "loss_curve.png").is_file()
    assert (run / "stage3-instruction" / "metrics.jsonl").is_file()


def test_rerun_skips_finished_stages(chexagent_run, phantoms: Path) -> None:
    run, results = chexagent_run
    before = _weights(run, "stage3-instruction")
    again = run_recipe(phantoms, run, preset="tiny", progress=False, max_eval=4, stages=[2, 3])
    assert again["stage3-instruction"]["final_loss"] == results["stage3-instruction"]["final_loss"]
    assert _same(before, _weights(run, "stage3-instruction"), "llm.")


def test_stage_by_stage_equals_one_run(chexagent_run, phantoms: Path, tmp_path: Path) -> None:
    run, _ = chexagent_run
    for stage in (0, 1, 2, 3):
        run_recipe(phantoms, tmp_path, preset="tiny", progress=False, max_eval=4, stages=[stage])
    a, b = _weights(run, "stage3-instruction"), _weights(tmp_path, "stage3-instruction")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_previous_stage_is_a_clear_error(phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run --stages 1 first"):
        run_recipe(phantoms, tmp_path, preset="tiny", progress=False, stages=[2])


def test_answers_only_loss_masking(chexagent_run) -> None:
    run, _ = chexagent_run
    model, tokenizer, cfg = load(run / "stage3-instruction" / "checkpoint")
    from cxrlite.data.records import TaskRecord

    rec = TaskRecord(
        id="x",
        task="view_classification",
        images=[],
        prompt="Which view?",
        answer="PA",
        split="train",
        source="test",
        options=["PA", "AP"],
    )
    item = InstructionDataset([rec], None, tokenizer, cfg.n_image_tokens, 64)[0]
    supervised = [t for t in item["labels"] if t != -100]
    assert tokenizer.decode(supervised, skip_special_tokens=True).strip() == "PA"
    assert supervised[-1] == tokenizer.eos_token_id
    n_prompt = len(item["input_ids"]) - len(supervised)
    assert item["labels"][:n_prompt] == [-100] * n_prompt


def test_llava_rad_with_lora_merges(phantoms: Path, tmp_path: Path) -> None:
    results = run_recipe(
        phantoms, tmp_path, preset="tiny", recipe="llava-rad", progress=False, max_eval=4
    )
    assert list(results) == ["stage1-projector", "stage2-projector-lora"]
    for r in results.values():
        assert r["eval"]["val_loss"] < r["val_loss_before"]
    merged = _weights(tmp_path, "stage2-projector-lora")
    assert not any("lora_" in k for k in merged)  # adapters merged into plain Llama weights
    assert not _same(_weights(tmp_path, "stage1-projector"), merged, "llm.")


def test_lora_merge_keeps_logits(chexagent_run) -> None:
    from peft import LoraConfig, get_peft_model

    run, _ = chexagent_run
    model, _, cfg = load(run / "stage3-instruction" / "checkpoint")
    model.llm = get_peft_model(
        model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    for name, p in model.llm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)  # fresh adapters are zero; make them matter
    ids = torch.randint(5, cfg.llm.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.llm = model.llm.merge_and_unload()
        after = model(input_ids=ids).logits
    assert (before - after).abs().max() < 1e-5


def test_plan_scales_and_selects() -> None:
    stages = plan("chexagent", "small", [2, 3], steps_scale=0.5)
    assert [s.index for s in stages] == [2, 3]
    assert stages[0].steps == round(CHEXAGENT[2].steps * 0.5)
    with pytest.raises(ValueError, match="no stage"):
        plan("chexagent", "small", [7])


def test_loss_weights_are_checked_and_weigh_the_terms() -> None:
    from cxrlite.model.config import get_preset
    from cxrlite.model.vision import build_vision
    from cxrlite.train.text_side import TextSide, VisionPretrainer

    with pytest.raises(ValueError, match="no loss term"):
        StageDef(1, "v", "vision_pretrain", {"vision": 1e-3}, 2, 2, loss_weights={"focal": 1.0})
    with pytest.raises(ValueError, match="no loss term"):  # a single-loss objective has none
        StageDef(0, "t", "text_lm", {"llm": 1e-3}, 2, 2, loss_weights={"caption": 1.0})
    cfg = get_preset("tiny").vision
    torch.manual_seed(0)
    vision, text = build_vision(cfg), TextSide(64, cfg, max_len=16, local_labels=True)
    batch = {
        "pixels": torch.randn(2, 1, cfg.image_size, cfg.image_size),
        "input_ids": torch.randint(4, 64, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "report_labels": torch.tensor([[1.0] * 14, [0.0] * 14]),
        "report_label_mask": torch.ones(2, 14),
    }
    batch["labels"] = batch["input_ids"]
    weights = {"contrastive": 0.5, "caption": 2.0, "report_labels": 5.0, "report_labels_local": 3.0}
    out = VisionPretrainer(vision, cfg, text, weights)(**batch)
    total = sum(weights[k] * out[k] for k in weights)
    assert torch.isclose(out["loss"], total, rtol=1e-6)


def test_instruction_report_label_terms(chexagent_run) -> None:
    """Stage 3's report-label terms: answers loss + weight x each label loss, read from the
    LLM's image positions and from the answer's start; a text-only example has its labels
    masked out and changes nothing."""
    from cxrlite.model.tokenizer import encode_example
    from cxrlite.train.data import collate
    from cxrlite.train.label_aux import InstructionWithLabels, answer_start_states
    from cxrlite.train.text_side import N_REPORT_LABELS

    with pytest.raises(ValueError, match="no loss term"):
        StageDef(
            3,
            "i",
            "instruction",
            {"llm": 1e-3},
            2,
            2,
            tasks={"view_classification": 1.0},
            loss_weights={"caption": 1.0},
        )
    assert CHEXAGENT[3].loss_weight("report_labels") > 0
    run, _ = chexagent_run
    model, tokenizer, cfg = load(run / CHEXAGENT[3].folder / "checkpoint")
    torch.manual_seed(0)
    weights = {"report_labels": 2.0, "answer_start_labels": 0.5}
    aux = InstructionWithLabels(model, weights)
    with pytest.raises(ValueError, match="no report-label term"):
        InstructionWithLabels(model, {"caption": 1.0})

    with_image = encode_example(
        tokenizer, "View?", "PA", with_image=True, n_image_tokens=cfg.n_image_tokens
    )
    text_only = encode_example(
        tokenizer,
        "Summarize: normal.",
        "Normal.",
        with_image=False,
        n_image_tokens=cfg.n_image_tokens,
    )
    n = N_REPORT_LABELS
    target = torch.zeros(n)
    target[2] = 1.0
    items = [
        {
            **with_image,
            "pixels": torch.randn(1, cfg.vision.image_size, cfg.vision.image_size),
            "report_labels": target,
            "report_label_mask": torch.ones(n),
        },
        {**text_only, "report_labels": torch.ones(n), "report_label_mask": torch.zeros(n)},
    ]
    batch = collate(items, tokenizer.pad_token_id)
    out = aux(**batch)
    assert torch.isfinite(out["loss"])
    total = out["answers"] + sum(w * out[term] for term, w in weights.items())
    assert torch.isclose(out["loss"], total, rtol=1e-5)
    only_image = aux(**collate(items[:1], tokenizer.pad_token_id))
    # the text-only row is masked: each label term is the image row's alone
    for term in weights:
        assert torch.isclose(out[term], only_image[term], rtol=1e-4)
    # the answer-start state is the one the first answer token is predicted from
    states = torch.arange(2 * 10 * 3).reshape(2, 10, 3).float()
    labels = torch.full((2, 10), -100)
    labels[0, 5:8] = 1
    picked = answer_start_states(states, labels)
    assert torch.equal(picked[0], states[0, 4]) and torch.equal(picked[1], states[1, 9])
    out["loss"].backward()
    for head in aux.heads.values():
        assert head.weight.grad.abs().sum() > 0
    assert next(model.bridger.parameters()).grad is not None


def test_two_process_ddp_run(phantoms: Path, tmp_path: Path) -> None:
    """The recipe under torchrun (2 CPU processes, gloo): stages 0-1, the vision stage included
    (its ViT has parameters that never get a gradient, which DDP must be told about)."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cxrlite.cli",
        "train",
        "--preset",
        "tiny",
        "--data",
        str(phantoms),
        "--out",
        str(tmp_path),
        "--stages",
        "0,1",
        "--max-eval",
        "4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage1-vision-encoder:") == 1  # rank 0 alone reports
    assert (tmp_path / "stage1-vision-encoder" / "checkpoint" / "model.safetensors").is_file()
