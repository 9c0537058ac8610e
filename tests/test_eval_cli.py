"""`cxrlite eval` on a tiny checkpoint and its bundle with a few phantoms: the comparison table,
eval.json's metrics with bootstrap intervals, fairness groups, the same numbers for the same seed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from runtime_testkit import runtime_bundle

from cxrlite.cli import main
from cxrlite.eval.chexbench import MC_TASKS, add_agreement, load_eval_data
from cxrlite.phantoms.generator import generate_phantoms


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-phantoms")
    generate_phantoms(root, 60, seed=0, size=64)  # 3 in the test split
    return root


def _run(args):
    result = CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_eval_data_is_the_test_split_with_choice_tasks(data):
    studies, records = load_eval_data(data, n=None, seed=0)
    assert studies and all(s.split == "test" for s in studies)
    assert records and {r.task for r in records} <= set(MC_TASKS)
    assert all(r.options and r.answer in r.options and r.images for r in records)
    assert load_eval_data(data, n=1, seed=0)[0] == studies[:1]


def test_eval_checkpoint_and_bundle(tmp_path_factory, data, tmp_path):
    _, ckpt, bundle = runtime_bundle(tmp_path_factory)
    common = ["--data", str(data), "--n", "2", "--bootstrap", "50", "--max-tokens", "8",
              "--threads", "1"]  # fmt: skip
    out = tmp_path / "ckpt"
    run = _run([str(ckpt), *common, "--out", str(out)])
    assert "Comparison (95% bootstrap CI)" in run.output and "torch-fp32" in run.output
    payload = json.loads((out / "eval.json").read_text())
    result = payload["results"]["torch-fp32"]
    assert payload["n_studies"] == result["n_studies"] == 2
    assert result["n_mc"] == payload["n_mc"] > 0
    mc = result["mc"]["all"]
    assert 0 <= mc["low"] <= mc["value"] <= mc["high"] <= 1
    for group in ("core5", "chexpert14"):
        for kind in ("micro_f1", "macro_f1"):
            ci = result["findings"][group][kind]
            assert 0 <= ci["low"] <= ci["high"] <= 1
    assert set(result["text"]) == {"rouge_l", "bleu"} and result["perplexity"] > 1
    assert set(result["fairness"]) == {"sex", "age"}
    assert sum(g["n"] for g in result["fairness"]["sex"]["groups"].values()) == 2
    assert "| torch-fp32 |" in (out / "eval.md").read_text()

    # the bundle: its GGUF variant beside the PyTorch reference (the source checkpoint exists)
    out_b = tmp_path / "bundle"
    run = _run([str(bundle), *common, "--variants", "torch-fp32,gguf-f32", "--out", str(out_b)])
    bundle_payload = json.loads((out_b / "eval.json").read_text())
    assert list(bundle_payload["results"]) == ["torch-fp32", "gguf-f32"]
    assert bundle_payload["results"]["gguf-f32"]["variants"]["llm"] == "gguf-f32"
    # the bundle's reference is the checkpoint itself: same seed, same numbers
    assert bundle_payload["results"]["torch-fp32"]["mc"] == result["mc"]
    assert bundle_payload["results"]["torch-fp32"]["findings"] == result["findings"]
    # gguf f32 decodes greedily to the reference's very text: llama.cpp's exact f32 path differs
    # from PyTorch far less than the random model's top-1/top-2 logit margins
    results = bundle_payload["results"]
    assert results["torch-fp32"]["same_text_as_reference"] == 1.0
    assert results["gguf-f32"]["generated"] == results["torch-fp32"]["generated"]
    assert results["gguf-f32"]["same_text_as_reference"] == 1.0


def test_eval_rejects_unknown_variants(tmp_path_factory, data):
    _, _, bundle = runtime_bundle(tmp_path_factory)
    result = CliRunner().invoke(
        main, ["eval", str(bundle), "--data", str(data), "--variants", "nope"]
    )
    assert result.exit_code == 1 and "unknown variants ['nope']" in result.output
    assert "--variants" in result.output and "Traceback" not in result.output


def test_agreement_counts_identical_texts():
    results = {"ref": {"generated": ["a b", "c", "d"]}, "q4": {"generated": ["a b", "c.", "d"]}}
    add_agreement(results)
    assert results["ref"]["same_text_as_reference"] == 1.0
    assert results["q4"]["same_text_as_reference"] == 2 / 3
