"""Training loop, EMA arithmetic, LR schedule and checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medsynth import MedsynthError
from medsynth.diffusion import diffusion_loss
from medsynth.training import EMA, load_checkpoint, save_checkpoint, train, warmup_cosine
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


def test_optimizer_comes_from_the_allow_list_with_plain_options() -> None:
    from medsynth import ConfigError
    from medsynth.training.build import build_optimizer

    params = list(torch.nn.Linear(2, 1).parameters())
    adam = build_optimizer({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01, "betas": [0.8, 0.9]}, params)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["lr"] == 0.01
    with pytest.raises(ConfigError, match=r"trainer.optimizer._target_ must be one of"):
        build_optimizer({"_target_": "os.system", "command": "true"}, params)
    with pytest.raises(ConfigError, match=r"trainer.optimizer.lr"):
        build_optimizer({"_target_": "torch.optim.SGD", "lr": {"_target_": "builtins.open"}}, params)
    with pytest.raises(ConfigError, match=r"trainer.optimizer: torch.optim.SGD does not accept"):
        build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.1, "warp": 9}, params)


def test_latent_diffusion_needs_unclipped_samples_even_without_the_pipeline_check() -> None:
    """A notebook calling the stage with its own settings gets the check PipelineSettings makes."""
    from medsynth import ConfigError
    from medsynth.config.settings import AutoencoderModelSettings, ModelSettings, SchedulerSettings, TrainerSettings
    from medsynth.config.settings import check_training

    latent = ModelSettings(conditioning="mask",
                           autoencoder=AutoencoderModelSettings(network={"_target_": "monai.networks.nets.AutoencoderKL"}))
    with pytest.raises(ConfigError, match="scheduler.clip_sample must be false for latent diffusion"):
        check_training(latent, SchedulerSettings(), TrainerSettings(), spatial_dims=2)
    check_training(latent, SchedulerSettings(clip_sample=False), TrainerSettings(), spatial_dims=2)
    with pytest.raises(ConfigError, match=r"model.network.spatial_dims must be the dataset's spatial_dims \(3\)"):
        check_training(ModelSettings(), SchedulerSettings(), TrainerSettings(), spatial_dims=3)


def test_resume_choices(tmp_path: Path) -> None:
    from medsynth.training.resume import resume_state

    config = {"model": {"conditioning": "mask"}, "scheduler": {"num_train_timesteps": 10}}
    assert resume_state(None, checkpoints=tmp_path, config=config) == (None, None)
    assert resume_state("auto", checkpoints=tmp_path, config=config) == (None, None)  # nothing yet: a fresh start
    with pytest.raises(MedsynthError, match=r"^trainer.resume=.*missing.pt: no checkpoint at .*missing.pt$"):
        resume_state(str(tmp_path / "missing.pt"), checkpoints=tmp_path, config=config)
    save_checkpoint(tmp_path / "last.pt", {"step": 2, "config": {**config, "trainer": {"max_steps": 2}}})
    path, state = resume_state("auto", checkpoints=tmp_path, config=config)
    assert path == tmp_path / "last.pt" and state["step"] == 2
    with pytest.raises(MedsynthError, match="another `scheduler` config"):
        resume_state("auto", checkpoints=tmp_path, config={**config, "scheduler": {"num_train_timesteps": 20}})


def test_train_stage_writes_a_generator_checkpoint_and_logs_its_settings(tiny_config, phantom) -> None:
    """The checkpoint holds what Generator.from_checkpoint needs; MLflow gets the model, scheduler and trainer settings."""
    from mlflow.tracking import MlflowClient

    from medsynth.config import to_mapping
    from medsynth.diffusion.generator import Generator
    from tests.conftest import phantom_overrides, run_stage

    cfg = tiny_config(*phantom_overrides(*phantom), "trainer.sampling.steps=4", "trainer.sampling.guidance_scale=2.0")
    run_stage("preprocess", cfg)
    last = run_stage("train", cfg)
    state = load_checkpoint(last)
    assert {"model", "ema", "optimizer", "lr_scheduler", "scaler", "step", "run_id", "val_loss", "best_val_loss",
            "label_names", "vocabulary", "spatial_dims", "image_size", "sampling", "config"} <= set(state)
    assert state["image_size"] == [16, 16] and state["spatial_dims"] == 2
    assert state["sampling"] == to_mapping(cfg.trainer.sampling)
    assert state["config"] == {"model": to_mapping(cfg.model), "scheduler": to_mapping(cfg.scheduler),
                               "trainer": to_mapping(cfg.trainer)}
    generator = Generator.from_checkpoint(last)
    assert generator.sampling.steps == 4 and generator.image_size == (16, 16)
    labels = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    assert generator.sample([0, 1], labels=labels).images.shape == (2, 1, 16, 16)
    assert (Path(cfg.paths.checkpoints) / "samples_step0000003.png").is_file()

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    params = client.get_run(state["run_id"]).data.params
    assert params["trainer.max_steps"] == "3" and params["trainer.sampling.guidance_scale"] == "2.0"
    assert params["scheduler.num_train_timesteps"] == "10" and params["model.conditioning"] == "mask"
    assert not [k for k in params if k.startswith(("data.", "generate.", "evaluate."))]


def test_latent_model_fits_its_autoencoder_once(tiny_config, phantom, caplog) -> None:
    """Latent diffusion trains the autoencoder first and reuses it while its settings are the same."""
    import logging

    from medsynth.diffusion.generator import Generator
    from tests.conftest import phantom_overrides, run_stage

    latent = ["model=latent", "scheduler.clip_sample=false", "model.autoencoder.network.channels=[8,8,8]",
              "model.autoencoder.network.norm_num_groups=8", "trainer.autoencoder.max_steps=2",
              "trainer.autoencoder.batch_size=2", "trainer.max_steps=1", "trainer.grid.num=1"]
    cfg = tiny_config(*phantom_overrides(*phantom), *latent)
    run_stage("preprocess", cfg)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        last = run_stage("train", cfg)
    saved = Path(cfg.paths.checkpoints) / "autoencoder.pt"
    assert saved.is_file() and "autoencoder 2 steps" in caplog.text
    generator = Generator.from_checkpoint(last)
    assert float(generator.model.latent_scale) > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medsynth"):
        run_stage("train", tiny_config(*phantom_overrides(*phantom), *latent, "trainer.max_steps=2"))
    assert f"autoencoder from {saved}" in caplog.text


def test_medsynth_train_is_the_stage_function(tiny_config) -> None:
    """`medsynth.train(...)` is the stage, also after the training package was imported."""
    import medsynth
    import medsynth.training

    from medsynth.stages import train as stage

    cfg = tiny_config()
    assert medsynth.training.EMA is EMA and medsynth.train is stage
    with pytest.raises(MedsynthError, match="no dataset manifest"):
        medsynth.train(model=cfg.model, scheduler=cfg.scheduler, trainer=cfg.trainer, run=cfg.run)
