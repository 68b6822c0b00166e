"""Latent diffusion trains from latents encoded once (``trainer.latent_cache``), with the batches it had before."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medsynth.config import PipelineSettings
from medsynth.data import infinite_batches, load_split, read_manifest
from medsynth.diffusion.generator import build_denoiser
from medsynth.training import load_checkpoint
from medsynth.training.latent_cache import CACHE_FILE, cached_latent_batches, flip_variants, latent_cache
from tests.conftest import run_stage

LATENT = ["model=latent", "scheduler.clip_sample=false", "model.network.channels=[8,8]",
          "model.network.norm_num_groups=8", "model.network.attention_levels=[false,false]",
          "model.autoencoder.network.channels=[8,8]", "model.autoencoder.network.attention_levels=[false,false]",
          "model.autoencoder.network.norm_num_groups=8", "trainer.autoencoder.max_steps=2",
          "trainer.autoencoder.batch_size=2", "trainer.grid.num=0", "trainer.validation.timestep_fractions=[0.5]"]


def test_flip_variants_cover_every_combination() -> None:
    assert flip_variants([]) == [()]
    assert flip_variants([0, 1]) == [(False, False), (True, False), (False, True), (True, True)]


@pytest.fixture
def preprocessed(tiny_config: Callable[..., PipelineSettings]) -> PipelineSettings:
    cfg = tiny_config(*LATENT, "trainer.flip_dims=[0,1]")
    run_stage("preprocess", cfg)
    return cfg


def test_cached_batches_are_the_encoded_batches(preprocessed: PipelineSettings, tmp_path: Path) -> None:
    """Step by step, the cached stream holds the latents of the images the uncached stream draws and flips."""
    cfg = preprocessed
    manifest = read_manifest(cfg.paths.data)
    data = load_split(manifest, "train", vocabulary={})
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, num_classes=manifest.num_classes, vocabulary={}).eval()
    model.latent_scale.fill_(0.7)
    latents = latent_cache(model, data, flip_dims=[0, 1], device=torch.device("cpu"), folder=tmp_path)
    assert latents.shape[:2] == (4, len(data))
    cached = cached_latent_batches(latents, data, batch_size=3, seed=5, flip_dims=[0, 1], start_step=2)
    plain = infinite_batches(data, batch_size=3, seed=5, flip_dims=[0, 1], start_step=2)
    flipped_somewhere = False
    for _ in range(2 * len(data)):
        (z, labels, codes), (images, plain_labels, plain_codes) = next(cached), next(plain)
        with torch.no_grad():
            expected = model.to_sample(images, plain_labels)
        torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(labels, plain_labels) and torch.equal(codes, plain_codes)
        flipped_somewhere |= not torch.equal(images, data.images[: len(images)])
    assert flipped_somewhere


def test_train_stage_encodes_once_and_a_rerun_reads_the_cache(preprocessed: PipelineSettings,
                                                              tiny_config: Callable[..., PipelineSettings],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cfg = preprocessed
    with caplog.at_level(logging.INFO, logger="medsynth"):
        run_stage("train", cfg)
    cache = Path(cfg.paths.checkpoints) / CACHE_FILE
    assert cache.is_file() and "training images encoded once (4 flip orientations)" in caplog.text
    stored = torch.load(cache, weights_only=True)
    assert set(stored) == {"key", "latents"} and stored["latents"].shape[0] == 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medsynth"):
        last = run_stage("train", tiny_config(*LATENT, "trainer.flip_dims=[0,1]", "trainer.max_steps=5",
                                              "trainer.resume=auto"))
    assert f"cached latents read from {cache}" in caplog.text and load_checkpoint(last)["step"] == 5


def test_a_changed_cache_is_not_used(preprocessed: PipelineSettings, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """A cache made for other weights (or a damaged file) is encoded afresh, with a warning for the damaged one."""
    cfg = preprocessed
    manifest = read_manifest(cfg.paths.data)
    data = load_split(manifest, "train", vocabulary={})
    model = build_denoiser(cfg.model, num_classes=manifest.num_classes, vocabulary={}).eval()
    first = latent_cache(model, data, flip_dims=[0], device=torch.device("cpu"), folder=tmp_path)
    model.latent_scale.fill_(2.0)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        second = latent_cache(model, data, flip_dims=[0], device=torch.device("cpu"), folder=tmp_path)
    assert "encoded once" in caplog.text and "read from" not in caplog.text
    torch.testing.assert_close(second, 2.0 * first, rtol=1e-4, atol=1e-6)  # the scale is part of the key
    (tmp_path / CACHE_FILE).write_bytes(b"not a cache")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medsynth"):
        latent_cache(model, data, flip_dims=[0], device=torch.device("cpu"), folder=tmp_path)
    assert "ignoring the unreadable latent cache" in caplog.text
