"""Training loop, EMA arithmetic, LR schedule and checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medsynth import MedsynthError
from medsynth.diffusion import diffusion_loss
from medsynth.train import EMA, load_checkpoint, save_checkpoint, train, warmup_cosine
from tests.test_diffusion import batch, tiny_denoiser


def test_ema_arithmetic() -> None:
    """shadow <- d * shadow + (1 - d) * w with the warm-up decay min(decay, (1+k)/(10+k))."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = EMA(model, decay=0.5)
    torch.nn.init.constant_(model.weight, 1.0)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    ema.update(model)
    assert ema.shadow.weight.item() == pytest.approx(0.9)  # 0.1 * 0 + 0.9 * 1
    ema.updates = 100  # warm-up over: decay = 0.5
    torch.nn.init.constant_(model.weight, 0.0)
    ema.update(model)
    assert ema.shadow.weight.item() == pytest.approx(0.45)
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 101 and restored.decay == 0.5
    assert restored.shadow.weight.item() == pytest.approx(0.45)


def test_warmup_cosine() -> None:
    f = functools.partial(warmup_cosine, warmup_steps=10, max_steps=110, min_factor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)


def test_loss_falls_when_overfitting_a_fixed_batch() -> None:
    """The loop learns: on one fixed batch the loss at the end is well below the start."""
    model = tiny_denoiser(2)
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="epsilon")
    fixed = batch(2, n=4, size=8)
    noise = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield fixed

    result = train(
        model, loss_fn=lambda m, b, step: diffusion_loss(m, b[0], b[1], scheduler, generator=noise), batches=batches(),
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), max_steps=60, progress=False,
    )
    assert result.steps == 60 and result.examples == 240
    start, end = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert end < 0.6 * start


def test_nonfinite_loss_stops_with_a_hint() -> None:
    model = torch.nn.Linear(1, 1)

    def batches():
        while True:
            yield torch.zeros(1, 1), torch.zeros(1, 1)

    with pytest.raises(FloatingPointError, match="trainer.lr"):
        train(model, loss_fn=lambda m, b, step: m(b[0]).sum() * float("nan"), batches=batches(),
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1), max_steps=2, progress=False)


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    model = tiny_denoiser(2)
    state = {"model": model.state_dict(), "step": 7, "config": {"trainer": {"max_steps": 7, "flip_dims": [0]}}}
    path = save_checkpoint(tmp_path / "checkpoints" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["config"]["trainer"]["flip_dims"] == [0]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded["model"][k], v)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_missing_or_corrupt_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(MedsynthError, match="medsynth train"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(MedsynthError, match="bad.pt"):
        load_checkpoint(bad)


def test_accumulated_steps_equal_one_large_batch() -> None:
    """Two accumulated half batches give the gradient, hence the step, of the whole batch."""
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def run(accumulate: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        size = 8 // accumulate

        def batches():
            while True:
                for i in range(0, 8, size):
                    yield x[i : i + size], y[i : i + size]

        train(model, loss_fn=lambda m, b, draw: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches=batches(),
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1), max_steps=3, grad_clip=None,
              accumulate=accumulate, progress=False)
        return model.weight.detach().clone()

    torch.testing.assert_close(run(2), run(1))


def test_bf16_autocast_trains_on_cpu() -> None:
    model = tiny_denoiser(2)
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="sample")
    fixed = batch(2, n=4, size=8)

    def batches():
        while True:
            yield fixed

    result = train(model, loss_fn=lambda m, b, draw: diffusion_loss(m, b[0], b[1], scheduler), batches=batches(),
                   optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), max_steps=30, precision="bf16", progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_precision_options_are_checked() -> None:
    model = torch.nn.Linear(1, 1)
    kwargs = dict(loss_fn=lambda m, b, d: m(b[0]).sum(), batches=iter([]), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  max_steps=1, progress=False)
    with pytest.raises(ValueError, match="trainer.precision"):
        train(model, precision="fp8", **kwargs)
    with pytest.raises(ValueError, match="GradScaler"):
        train(model, precision="fp16", **kwargs)
    with pytest.raises(ValueError, match="trainer.accumulate"):
        train(model, accumulate=0, **kwargs)
