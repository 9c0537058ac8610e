"""cxrlite.eval.quality: the gate's threshold, held-out phantoms, and evaluate_variant reproducing the
PyTorch evaluation (cxrlite.eval.evaluation) through the runtime's torch backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from runtime_testkit import runtime_bundle

from cxrlite.eval.evaluation import generate_findings, multiple_choice_accuracy, score_findings
from cxrlite.eval.quality import evaluate_variant, held_out_phantoms, quality_gate
from cxrlite.imaging.decode import load_image
from cxrlite.imaging.preprocess import preprocess


def metrics(f1: float, accuracy: float = 0.5, perplexity: float = 10.0) -> dict:
    return {"findings_f1": f1, "mc_accuracy": accuracy, "perplexity": perplexity}


def test_gate_passes_at_the_threshold_and_fails_beyond():
    reference = metrics(0.80)
    ok, deltas = quality_gate(reference, metrics(0.78))  # a drop of exactly 0.02
    assert ok and deltas["failed"] == [] and math.isclose(deltas["findings_f1"], -0.02)
    ok, deltas = quality_gate(reference, metrics(0.779))
    assert not ok and "findings F1 dropped 0.0210" in deltas["failed"][0]
    assert quality_gate(reference, metrics(0.85))[0]  # better is fine
    assert quality_gate(reference, metrics(0.70), max_f1_drop=0.1)[0]
    # accuracy and perplexity gate only when asked
    assert quality_gate(reference, metrics(0.80, accuracy=0.1))[0]
    ok, deltas = quality_gate(reference, metrics(0.80, accuracy=0.4), max_accuracy_drop=0.05)
    assert not ok and "MC accuracy dropped" in deltas["failed"][0]
    ok, deltas = quality_gate(reference, metrics(0.80, perplexity=12.0), max_perplexity_ratio=1.1)
    assert not ok and math.isclose(deltas["perplexity_ratio"], 1.2)
    assert quality_gate(reference, metrics(0.80, perplexity=10.5), max_perplexity_ratio=1.1)[0]
    assert not quality_gate(reference, metrics(float("nan")))[0]  # an unmeasured F1 never passes


def test_held_out_phantoms_are_test_split_pngs_with_tasks(tmp_path):
    with held_out_phantoms(3, seed=4, size=64) as held:
        root = held.root
        assert len(held.studies) == 3 and all(s.split == "test" for s in held.studies)
        assert all(load_image(s.image).pixels.shape == (64, 64) for s in held.studies)
        assert held.mc_records and all(r.options and r.answer in r.options for r in held.mc_records)
        assert {r.images[0] for r in held.mc_records if r.images} <= {s.image for s in held.studies}
        assert (
            # the text form stage 0 trains on: no section headers
            held.report_texts == [s.narrative for s in held.studies]
            and "FINDINGS:" not in held.report_texts[0]
            and held.studies[0].findings in held.report_texts[0]
        )
    assert not root.exists()  # the temporary folder is removed
    kept = held_out_phantoms(1, seed=4, size=64, out_dir=tmp_path / "held")
    kept.cleanup()
    assert (tmp_path / "held" / "images").is_dir()  # a folder the caller named is kept


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from cxrlite.runtime import Runtime

    model, _, bundle = runtime_bundle(tmp_path_factory)
    threads = torch.get_num_threads()
    # threads=1 (process-wide for torch, restored below): a model this small gains nothing from
    # more threads, and on a busy machine their contention slows it down badly.
    runtime = Runtime.from_bundle(
        bundle, vision_backend="torch", llm_backend="torch", threads=1, warmup=False
    )
    yield model, runtime
    runtime.close()
    torch.set_num_threads(threads)


def test_evaluate_variant_reproduces_the_pytorch_evaluation(reference):
    model, runtime = reference
    with held_out_phantoms(4, seed=2, size=64) as held:
        records = held.mc_records[:6]
        result = evaluate_variant(runtime, held.studies, records, held.report_texts, max_tokens=24)

        def pixels_for(path):
            return torch.tensor(preprocess(load_image(path).pixels, runtime.pre))

        texts = generate_findings(
            model, runtime.tokenizer, held.studies, pixels_for, max_new_tokens=24
        )
        want_f1 = score_findings(texts, held.studies)["macro_f1"]
        want_mc = multiple_choice_accuracy(model, runtime.tokenizer, records, pixels_for)
    assert result["variants"] == {"vision": "torch-fp32", "llm": "torch-fp32"}
    assert result["findings_f1"] == want_f1
    assert result["mc"] == want_mc
    hits = sum(v["accuracy"] * v["n"] for v in want_mc.values())
    assert math.isclose(result["mc_accuracy"], hits / len(records))
    assert (result["n_studies"], result["n_mc"], result["n_texts"]) == (4, len(records), 4)
    assert np.isfinite(result["perplexity"]) and result["perplexity"] > 1.0
    assert result["n_tokens"] > 40 and result["wall_s"] > 0
