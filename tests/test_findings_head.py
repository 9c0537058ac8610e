"""The findings head: fitted on image embeddings, exported into the bundle, stating the findings
checklist at inference with the LLM's prose after it (cxrlite.model.findings)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from runtime_testkit import noisy_tiny_model, random_pixels

from cxrlite.data.labels import NEGATIVE, POSITIVE
from cxrlite.data.prompts import checklist_text
from cxrlite.eval.evaluation import generate_findings
from cxrlite.eval.labeler import label_report
from cxrlite.model.checkpoint import load, save
from cxrlite.model.config import FindingsHeadConfig, ModelConfig, get_preset
from cxrlite.model.findings import (
    FINDINGS_HEAD_FILE,
    FindingsReader,
    decisions,
    findings_text,
)
from cxrlite.model.vlm import CXRVLM
from cxrlite.train.findings_head import best_thresholds, fit_findings_head, fit_linear

IMAGES = [random_pixels(seed) for seed in range(6)]


@pytest.fixture(scope="module")
def head_bundle(tmp_path_factory) -> tuple[CXRVLM, Path, Path]:
    """A tiny model with a random findings head whose thresholds split the test images' logits
    halfway between the middle two (so the checklists mix present and absent findings, and no
    logit lies near a threshold, where ONNX and PyTorch rounding could decide differently)."""
    from cxrlite.export.bundle import export_bundle
    from cxrlite.export.gguf_builder import gguf_builder

    root = tmp_path_factory.mktemp("findings-head")
    model, tokenizer = noisy_tiny_model(root, findings_head={})
    ranked = torch.tensor(_torch_logits(model)).sort(0).values
    middle = ranked[len(IMAGES) // 2 - 1 : len(IMAGES) // 2 + 1]
    thresholds = tuple(float(t) for t in middle.mean(0))
    cfg = model.cfg.replace(findings_head=FindingsHeadConfig(thresholds=thresholds))
    model.cfg = cfg
    ckpt = save(model, tokenizer, cfg, root / "ckpt")
    bundle = export_bundle(ckpt, root / "bundle", extra_builders=[gguf_builder(ckpt, "f32")])
    return model, ckpt, bundle.path


def test_checklist_states_each_finding_against_its_threshold() -> None:
    cfg = FindingsHeadConfig(thresholds=(0.0, 1.0, -1.0, 0.5, 2.0))
    logits = [0.0, 0.9, -0.5, 0.5, -3.0]
    assert decisions(logits, cfg)["Pleural Effusion"] == NEGATIVE
    text = checklist(logits, cfg)
    assert text == ("Cardiomegaly. No pleural effusion. Pneumothorax. Consolidation. No edema.")
    labels = label_report(text)  # the report labeler reads the checklist as the head decided
    assert [labels[o] for o in cfg.observations] == [
        POSITIVE, NEGATIVE, POSITIVE, POSITIVE, NEGATIVE
    ]  # fmt: skip


def test_findings_text_drops_the_prose_that_contradicts_the_checklist() -> None:
    stated = decisions([1.0, -1.0, -1.0, 1.0, -1.0], FindingsHeadConfig())
    prose = (
        "PA and lateral views of the chest. The heart is not enlarged. There is consolidative "
        "opacity in the right lower lobe. Possible small left pleural effusion! No pneumothorax."
    )
    assert findings_text(stated, prose) == (
        "Cardiomegaly. No pleural effusion. No pneumothorax. Consolidation. No edema. "
        "PA and lateral views of the chest. There is consolidative opacity in the right lower "
        "lobe. No pneumothorax."
    )  # "not enlarged" denies the stated cardiomegaly; a possible effusion the stated absence
    assert findings_text(stated, "") == checklist_text(stated)


def test_config_rejects_a_bad_head() -> None:
    with pytest.raises(ValueError, match="checklist findings"):
        FindingsHeadConfig(observations=("Fracture",), thresholds=(0.0,))
    with pytest.raises(ValueError, match="one finite threshold"):
        FindingsHeadConfig(thresholds=(0.0,))
    cfg = get_preset("tiny", findings_head={"thresholds": [0, 0, 0, 0, 1]})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # round-trips through config.json


def test_fit_linear_separates_and_folds_the_standardization() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 40, generator=gen) * 3 + 5  # far from standardized
    y = (x[:, :5] - 5 + 0.3 * torch.randn(400, 5, generator=gen) > 0).float()
    weight, bias = fit_linear(x, y, seed=0)
    accuracy = ((x @ weight.T + bias > 0).float() == y).float().mean()
    assert accuracy > 0.9
    again = fit_linear(x, y, seed=0)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)  # deterministic


def test_best_thresholds_maximize_f1() -> None:
    logits = np.array([[3.0], [2.0], [1.0], [0.0], [-2.0]])
    truth = np.array([[True], [True], [False], [True], [False]])
    # >= 0 keeps 3 of 3 positives and 1 false: F1 6/7, the best; halfway to the next logit
    assert best_thresholds(logits, truth) == [-1.0]
    assert best_thresholds(logits, np.zeros_like(truth)) == [0.0]


def test_unlabelled_studies_fit_no_head(head_bundle) -> None:
    model, _, _ = head_bundle
    cfg = model.cfg.replace(findings_head=None)
    unlabelled = {"train": [SimpleNamespace(chexpert={})], "validate": []}
    assert fit_findings_head(model, cfg, unlabelled, lambda k: None, seed=0) == (cfg, None)


def test_bundle_head_reads_what_the_checkpoint_head_reads(head_bundle) -> None:
    from cxrlite.runtime import Runtime

    model, _, bundle = head_bundle
    assert (bundle / FINDINGS_HEAD_FILE).is_file()
    with Runtime.from_bundle(bundle, threads=1) as rt:
        for pixels in IMAGES:
            embeds = rt.image_embeddings(pixels, use_cache=False).embeds
            with torch.no_grad():
                expected = model.findings_head(model.encode_image(torch.tensor(pixels[None])))[0]
            np.testing.assert_allclose(rt.findings_head.logits(embeds), expected, atol=1e-4)


def test_runtime_findings_equal_the_trainers(head_bundle) -> None:
    """The runtime (ONNX vision, llama.cpp LLM) and the trainer's evaluation (PyTorch) state the
    same checklist and write the same prose after it."""
    from cxrlite.runtime import Runtime

    model, ckpt, bundle = head_bundle
    reloaded, tokenizer, _ = load(ckpt)
    studies = [SimpleNamespace(image=str(i)) for i in range(len(IMAGES))]
    expected = generate_findings(
        reloaded, tokenizer, studies, lambda k: torch.tensor(IMAGES[int(k)]), max_new_tokens=12
    )
    stated = {checklist(r, reloaded.cfg.findings_head) for r in _torch_logits(reloaded)}
    assert len(stated) > 1  # the images' checklists differ
    with Runtime.from_bundle(bundle, threads=1) as rt:
        got = [rt.findings(pixels, max_tokens=12) for pixels in IMAGES]
        report = rt.report(IMAGES[0], max_tokens=12)
    for c, logits, text in zip(got, _torch_logits(reloaded), expected, strict=True):
        stated = checklist(logits, reloaded.cfg.findings_head)
        assert c.text.startswith(stated + " ")
        assert len(c.tokens) == 12  # the prose's tokens; the checklist is in the prompt
        # the same ids (the random model's byte pieces stream-decode differently from a decode)
        assert f"{stated} {tokenizer.decode(c.tokens, skip_special_tokens=True).strip()}" == text
    assert report["findings"] == got[0].text


def test_checkpoint_runtime_carries_the_head(head_bundle) -> None:
    """`cxrlite eval CHECKPOINT` (the PyTorch reference runtime) states the same checklist."""
    from cxrlite.eval.chexbench import checkpoint_runtime

    model, ckpt, _ = head_bundle
    with checkpoint_runtime(ckpt, threads=1, device="cpu") as rt:
        got = [rt.findings(pixels, max_tokens=4).text for pixels in IMAGES]
    for text, logits in zip(got, _torch_logits(model), strict=True):
        assert text.startswith(checklist(logits, model.cfg.findings_head) + " ")


def checklist(logits: list[float], cfg: FindingsHeadConfig) -> str:
    return checklist_text(decisions(logits, cfg))


def _torch_logits(model: CXRVLM) -> list[list[float]]:
    with torch.no_grad():
        return model.findings_head(model.encode_image(torch.tensor(np.stack(IMAGES)))).tolist()


def test_reader_rejects_mismatched_weights() -> None:
    cfg = FindingsHeadConfig()
    with pytest.raises(ValueError, match="do not match"):
        FindingsReader(np.zeros((4, 8), np.float32), np.zeros(4, np.float32), cfg)
    reader = FindingsReader(np.zeros((5, 8), np.float32), np.zeros(5, np.float32), cfg)
    with pytest.raises(ValueError, match="reads 8 numbers"):
        reader.logits(np.zeros((3, 4), np.float32))
