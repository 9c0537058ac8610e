"""The peer side of `cxrlite bench compare --llama-server`: the transformers folder that llama.cpp's
converter turns into an mmproj holds the bundle's own vision weights (transformers, loading it as
MedGemma, computes the same image embeddings as the bundle's ONNX tower), and llama-server's
command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medgemma_testkit import TOKENS_PER_IMAGE, write_medgemma

from cxrlite.bench.mmproj import FOLDER_WRITERS, MmprojError, write_mmproj
from cxrlite.bench.servers import llama_server_spec
from cxrlite.export.importers.medgemma import import_medgemma
from cxrlite.model.checkpoint import load_config, load_weights
from cxrlite.runtime.onnx_runner import onnx_session


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    src = write_medgemma(tmp_path_factory.mktemp("medgemma") / "medgemma-4b-it")
    return import_medgemma(src, tmp_path_factory.mktemp("out") / "bundle", accept_license=True)


def test_the_folder_for_llama_cpps_converter_holds_the_bundles_vision_tower(imported, tmp_path):
    from transformers import Gemma3ForConditionalGeneration

    ckpt = imported.path.with_name("bundle-checkpoint")
    cfg = load_config(ckpt)
    FOLDER_WRITERS["gemma3"](cfg, load_weights(ckpt), tmp_path)
    model = Gemma3ForConditionalGeneration.from_pretrained(
        str(tmp_path), local_files_only=True, dtype=torch.float32
    ).eval()
    pixels = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    want = getattr(want, "pooler_output", want).reshape(1, TOKENS_PER_IMAGE, -1).numpy()
    session = onnx_session(imported.variant_file("vision", "onnx-fp32"), ["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels})[0]
    assert np.abs(got - want).max() < 1e-4


def test_write_mmproj_needs_a_llama_cpp_tree_and_a_known_projector(imported, tmp_path):
    ckpt = imported.path.with_name("bundle-checkpoint")
    with pytest.raises(MmprojError, match="no convert_hf_to_gguf.py"):
        write_mmproj(ckpt, tmp_path, tmp_path / "mmproj.gguf")
    assert not (tmp_path / "mmproj.gguf").exists()


def test_llama_server_gets_the_same_context_per_slot_and_the_mmproj():
    spec = llama_server_spec("llama-server", "m.gguf", 8080, 2, 1024, mmproj="p.gguf", parallel=4)
    command = spec.command
    assert command[command.index("--ctx-size") + 1] == "4096"  # split over 4 slots
    assert command[command.index("--parallel") + 1] == "4"
    assert command[command.index("--mmproj") + 1] == "p.gguf"
    assert spec.ready_path == "/health" and spec.url == "http://127.0.0.1:8080"
