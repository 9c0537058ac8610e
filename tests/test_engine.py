"""The generic training engine on toy problems: learning, freezing, schedule, exact resume."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from PIL import Image
from torch import nn

from cxrlite.device import DeviceError, resolve_device
from cxrlite.fileio import read_jsonl
from cxrlite.train.checkpoint import CheckpointError, latest_checkpoint
from cxrlite.train.engine import train_stage
from cxrlite.train.run_state import NonFiniteLossError
from cxrlite.train.sampler import ResumableBatchSampler
from cxrlite.train.schedule import lr_multiplier
from cxrlite.train.spec import StageResult, StageSpec, StageSpecError

TRUE_W = torch.tensor([1.5, -2.0, 0.5])


def make_dataset(n: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ TRUE_W + 0.5
    return [(x[i], y[i]) for i in range(n)]


def collate(items):
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}


class ToyNet(nn.Module):
    def __init__(self, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(3, 8)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x))).squeeze(-1)


def groups(model: ToyNet) -> dict:
    return {"encoder": list(model.encoder.parameters()), "head": list(model.head.parameters())}


def mse(model: nn.Module, batch: dict) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def spec(**changes) -> StageSpec:
    base = dict(
        name="toy", max_steps=9, batch_size=2, lr={"encoder": 0.02, "head": 0.02}, warmup_steps=2
    )
    return StageSpec(**{**base, **changes})


def train(
    out_dir, stage: StageSpec, model: nn.Module | None = None, data=None, **kwargs
) -> tuple[StageResult, nn.Module]:
    model = model if model is not None else ToyNet()
    kwargs.setdefault("plot", False)
    kwargs.setdefault("progress", False)
    param_groups = kwargs.pop("param_groups", groups)
    result = train_stage(
        stage,
        model,
        param_groups,
        mse,
        data or make_dataset(),
        collate,
        out_dir,
        device="cpu",
        **kwargs,
    )
    return result, model


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


def train_losses(out_dir) -> list[float]:
    rows = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r["kind"] == "train"]
    return [r["loss"] for r in rows]


def test_loss_falls_on_learnable_problem(tmp_path):
    data = make_dataset(32)
    val_x = torch.stack([x for x, _ in data])
    val_y = torch.stack([y for _, y in data])

    def evaluate(model):
        return {"val_loss": nn.functional.mse_loss(model(val_x), val_y).item()}

    model = ToyNet()
    with torch.no_grad():
        initial_val = evaluate(model)["val_loss"]
    stage = spec(
        max_steps=80, lr={"encoder": 0.05, "head": 0.05}, warmup_steps=5, clip_grad_norm=None
    )
    result, _ = train(tmp_path, stage, model=model, data=data, eval_fn=evaluate)
    assert result.steps == 80 and result.samples_seen == 160
    assert initial_val > 1.0
    assert result.eval["val_loss"] < 0.01 * initial_val
    assert result.final_loss_avg < 0.01 * initial_val


def test_lr_zero_group_is_frozen_and_others_train(tmp_path):
    model = ToyNet()
    before = params(model)
    stage = spec(lr={"encoder": 0.0, "head": 0.05})
    param_groups = {"encoder": model.encoder.parameters(), "head": model.head.parameters()}
    result, _ = train(tmp_path, stage, model=model, param_groups=param_groups)
    after = params(model)
    assert not model.encoder.weight.requires_grad and not model.encoder.bias.requires_grad
    assert model.head.weight.requires_grad
    assert torch.equal(after["encoder.weight"], before["encoder.weight"])
    assert torch.equal(after["encoder.bias"], before["encoder.bias"])
    assert (after["head.weight"] - before["head.weight"]).abs().max() > 1e-3
    saved = torch.load(os.path.join(result.checkpoint, "model.pt"), weights_only=True)
    assert sorted(saved) == ["head.bias", "head.weight"]  # frozen weights are not checkpointed
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["lr/head"] > 0 and "lr/encoder" not in rows[0]


def test_schedule_warmup_then_cosine_to_min(tmp_path):
    kw = dict(max_steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_multiplier(1, **kw) == 0.25
    assert lr_multiplier(4, **kw) == 1.0
    assert lr_multiplier(7, **kw) == pytest.approx(0.55, abs=1e-12)  # halfway down the cosine
    assert lr_multiplier(10, **kw) == pytest.approx(0.1, abs=1e-12)
    assert lr_multiplier(11, **kw) == pytest.approx(0.1, abs=1e-12)
    assert lr_multiplier(3, max_steps=3, warmup_steps=3, min_lr_ratio=0.0) == 1.0

    train(tmp_path, spec(lr={"encoder": 0.02, "head": 0.2}, **kw))
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    expected_head = [0.05, 0.1, 0.15, 0.2, None, None, 0.11, None, None, 0.02]
    for row, want in zip(rows, expected_head, strict=True):
        if want is not None:
            assert row["lr/head"] == pytest.approx(want, rel=1e-12)
        assert row["lr/encoder"] == pytest.approx(row["lr/head"] / 10, rel=1e-12)


def test_grad_accumulation_equals_larger_batch(tmp_path):
    _, accumulated = train(tmp_path / "a", spec(batch_size=1, grad_accum=2, max_steps=6))
    _, batched = train(tmp_path / "b", spec(batch_size=2, grad_accum=1, max_steps=6))
    initial = params(ToyNet())
    moved = 0.0
    for (key, a), b in zip(params(accumulated).items(), params(batched).values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), key
        moved = max(moved, (a - initial[key]).abs().max().item())
    assert moved > 1e-2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted dropout run crossing epoch boundaries (12 samples / 2 per step)."""
    out = tmp_path_factory.mktemp("reference")
    stage = spec(max_steps=15, checkpoint_every=4)
    _, model = train(out, stage, model=ToyNet(dropout=0.3))
    return stage, model, train_losses(out)


def test_crash_then_resume_matches_uninterrupted_run(tmp_path, reference):
    stage, uninterrupted, losses = reference

    def crash_at_step_10(step, record):
        if step == 10:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, stage, model=ToyNet(dropout=0.3), on_step=crash_at_step_10)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000008"
    # A different initialization proves every trainable tensor comes from the checkpoint.
    result, resumed = train(tmp_path, stage, model=ToyNet(seed=5, dropout=0.3))
    assert result.resumed and result.start_step == 8 and result.steps == 15
    assert_params_equal(resumed, uninterrupted)
    assert train_losses(tmp_path) == losses  # steps 9 and 10 logged once, with the same values


def test_keyboard_interrupt_writes_checkpoint_and_resumes_exactly(tmp_path, reference):
    stage, uninterrupted, losses = reference

    def interrupt_at_step_6(step, record):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, stage, model=ToyNet(dropout=0.3), on_step=interrupt_at_step_6)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000006"
    result, resumed = train(tmp_path, stage, model=ToyNet(seed=7, dropout=0.3))
    assert result.start_step == 6
    assert_params_equal(resumed, uninterrupted)
    assert train_losses(tmp_path) == losses


def test_sigint_finishes_the_step_then_checkpoints(tmp_path, reference):
    stage, uninterrupted, _ = reference

    def ctrl_c_during_step_2(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, stage, model=ToyNet(dropout=0.3), on_step=ctrl_c_during_step_2)
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    _, resumed = train(tmp_path, stage, model=ToyNet(dropout=0.3))
    assert_params_equal(resumed, uninterrupted)


def test_half_written_checkpoints_are_ignored(tmp_path, reference):
    stage, uninterrupted, _ = reference

    def crash_at_step_9(step, record):
        if step == 9:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(tmp_path, stage, model=ToyNet(dropout=0.3), on_step=crash_at_step_9)
    root = tmp_path / "checkpoints"
    temp = root / ".tmp-step_00000012-999-1"  # what a crash during a write leaves
    temp.mkdir()
    (temp / "state.pt").write_bytes(b"truncated")
    partial = root / "step_00000011"  # a folder lacking files is never trusted either
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"junk")
    assert latest_checkpoint(root).name == "step_00000008"
    result, resumed = train(tmp_path, stage, model=ToyNet(dropout=0.3))
    assert result.start_step == 8
    assert not temp.exists()
    assert_params_equal(resumed, uninterrupted)


def test_outputs_metrics_plot_and_result(tmp_path):
    stage = spec(max_steps=6, eval_every=3, checkpoint_every=2, keep_checkpoints=2)
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"val_loss": 1.25, "accuracy": 0.5}

    result, _ = train(tmp_path, stage, eval_fn=evaluate, plot=True)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"] == [
        (3, 1.25),
        (6, 1.25),
    ]
    assert calls == [False, False]  # eval_fn sees the model in eval mode
    for row in rows:
        if row["kind"] == "train":
            assert {"loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"} <= row.keys()
            assert math.isfinite(row["loss"]) and row["samples_per_s"] > 0
    with Image.open(tmp_path / "loss_curve.png") as image:
        assert image.format == "PNG" and image.size == (800, 450)
    saved = json.loads((tmp_path / "stage_result.json").read_text())
    assert saved == result.to_dict()
    assert result.eval == {"val_loss": 1.25, "accuracy": 0.5}
    assert result.first_loss == rows[0]["loss"]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]


def test_finished_stage_resume_only_loads_weights(tmp_path):
    stage = spec(max_steps=4)
    first, trained = train(tmp_path, stage)
    again, reloaded = train(tmp_path, stage, model=ToyNet(seed=3))
    assert again.start_step == 4 and again.steps == 4 and again.resumed
    assert again.final_loss == first.final_loss
    assert_params_equal(reloaded, trained)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(tmp_path, stage.replace(batch_size=1, max_steps=8))
    fresh, _ = train(tmp_path, stage.replace(batch_size=1), resume=False)
    assert fresh.start_step == 0 and not fresh.resumed


def test_non_finite_loss_stops_before_the_update(tmp_path):
    model = ToyNet()

    def nan_at_third_call(model, batch, calls=[0]):  # noqa: B006 - a call counter
        calls[0] += 1
        loss = mse(model, batch)
        return loss * float("nan") if calls[0] == 3 else loss

    with pytest.raises(NonFiniteLossError, match="step 3"):
        train_stage(
            spec(),
            model,
            groups,
            nan_at_third_call,
            make_dataset(),
            collate,
            tmp_path,
            device="cpu",
            progress=False,
            plot=False,
        )
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_spec_and_group_validation(tmp_path):
    with pytest.raises(StageSpecError, match="max_steps"):
        spec(max_steps=0)
    with pytest.raises(StageSpecError, match="warmup_steps"):
        spec(max_steps=3, warmup_steps=4)
    with pytest.raises(StageSpecError, match="nothing would train"):
        spec(lr={"encoder": 0.0, "head": 0.0})
    with pytest.raises(StageSpecError, match="lr"):
        spec(lr={"encoder": -1.0, "head": 0.1})
    with pytest.raises(StageSpecError, match="batch_size"):
        spec(batch_size=True)
    with pytest.raises(StageSpecError, match="unknown stage field"):
        StageSpec.from_dict({"name": "x", "max_steps": 1, "lr": {"a": 1.0}, "learning_rate": 1})
    assert StageSpec.from_dict(spec().to_dict()) == spec()
    with pytest.raises(StageSpecError, match="missing: \\['head'\\]"):
        train_stage(
            spec(),
            ToyNet(),
            lambda m: {"encoder": m.encoder.parameters()},
            mse,
            make_dataset(),
            collate,
            tmp_path,
            device="cpu",
        )
    with pytest.raises(StageSpecError, match="in both group"):
        train_stage(
            spec(),
            ToyNet(),
            lambda m: {"encoder": m.parameters(), "head": m.head.parameters()},
            mse,
            make_dataset(),
            collate,
            tmp_path,
            device="cpu",
        )


def test_sampler_shards_and_resumes_mid_epoch():
    single = ResumableBatchSampler(10, 2, seed=4)
    ranks = [ResumableBatchSampler(10, 1, seed=4, rank=r, world_size=2) for r in range(2)]
    assert single.batches_per_epoch == 5
    joined = [
        a + b
        for a, b in zip(ranks[0].remaining_in_epoch(), ranks[1].remaining_in_epoch(), strict=True)
    ]
    assert joined == single.remaining_in_epoch()
    assert sorted(i for batch in joined for i in batch) == list(range(10))
    single.advance(), single.advance()
    saved = single.state_dict()
    restored = ResumableBatchSampler(10, 2, seed=4)
    restored.load_state_dict(saved)
    assert restored.remaining_in_epoch() == joined[2:]
    for _ in range(3):
        restored.advance()
    assert restored.state_dict() == {"epoch": 1, "offset": 0}
    assert restored.permutation(1) != restored.permutation(0)


def test_resolve_device_on_this_machine():
    device, dtype, reason = resolve_device("cpu")
    assert device == torch.device("cpu") and dtype is None and "fp32" in reason
    if not torch.cuda.is_available():
        assert resolve_device(None).device == torch.device("cpu")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("quantum")
