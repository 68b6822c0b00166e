"""The audit: figures on constructed cases, the verdict, the report, and the models it trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.data import LabelledArrays
from medsynth.diffusion import denoising_errors
from medsynth.evaluation import AuditSet, Figure, privacy_figures, realism_figures, render_report, utility_figures, verdict
from medsynth.io import save_png
from medsynth.training.encoder import FeatureEncoder, encode, nt_xent, train_encoder
from medsynth.training.segmenter import segment, train_segmenter
from medsynth.transforms import random_views
from monai.networks.schedulers import DDPMScheduler
from tests.test_diffusion import tiny_denoiser


def blobs(n: int, *, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Images of random discs (label 1) and squares (label 2) with texture, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = np.zeros((n, 1, size, size), np.float32), np.zeros((n, 1, size, size), np.int64)
    for i in range(n):
        cy, cx, r = rng.integers(4, size - 4, 2).tolist() + [rng.integers(2, 4)]
        labels[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        sy, sx = rng.integers(0, size - 4, 2)
        labels[i, 0, sy : sy + 3, sx : sx + 3] = 2
        images[i, 0] = np.clip(0.4 * labels[i, 0] + 0.1 * rng.random((size, size)), 0, 1)
    return images, labels


def features(x: np.ndarray) -> np.ndarray:
    """A fixed, simple feature map: 2x2 average-pooled pixels."""
    t = torch.as_tensor(x)
    return torch.nn.functional.avg_pool2d(t, 4).flatten(1).numpy()


def privacy_case(synthetic_images: np.ndarray, synthetic_labels: np.ndarray):
    train_i, train_l = blobs(30, seed=1)
    hold_i, hold_l = blobs(20, seed=2)
    return privacy_figures(
        AuditSet(train_i, train_l, features(train_i)), AuditSet(hold_i, hold_l, features(hold_i)),
        AuditSet(synthetic_images, synthetic_labels, features(synthetic_images)), num_classes=3,
        member_errors=np.linspace(0, 1, 30), nonmember_errors=np.linspace(2, 3, 20),
    )


def by_name(figures: list[Figure]) -> dict[str, float]:
    return {f.name: f.value for f in figures}


def test_copies_of_training_images_are_flagged() -> None:
    """A synthetic set made of (intensity-shifted) training images breaks every privacy figure."""
    train_i, train_l = blobs(30, seed=1)
    copies = np.clip(0.9 * train_i[:10] + 0.05, 0, 1).astype(np.float32)
    figures, correlation, nearest = privacy_case(copies, train_l[:10])
    f = by_name(figures)
    assert f["privacy/memorised_count"] == 10
    assert f["privacy/max_correlation_to_train"] > 0.99
    np.testing.assert_array_equal(nearest, np.arange(10))
    assert f["privacy/closer_to_train_fraction_pixel"] == 1.0
    assert f["privacy/label_dice_to_nearest_train"] == pytest.approx(1.0)
    assert f["privacy/membership_auc"] == 1.0  # members have lower errors in this constructed case


def test_fresh_images_are_not_flagged() -> None:
    """New images from the same distribution: nothing memorised, about as near to train as to holdout."""
    fresh_i, fresh_l = blobs(20, seed=3)
    figures, _, _ = privacy_case(fresh_i, fresh_l)
    f = by_name(figures)
    assert f["privacy/memorised_count"] == 0
    assert f["privacy/max_correlation_to_train"] < 0.95
    assert 0.2 < f["privacy/closer_to_train_fraction_pixel"] < 0.9
    assert f["privacy/label_dice_to_nearest_train"] < 0.95


def test_realism_ranks_real_like_images_above_noise() -> None:
    train_i, train_l = blobs(40, seed=1)
    hold_i, hold_l = blobs(20, seed=2)
    good_i, good_l = blobs(20, seed=3)
    noise = np.random.default_rng(0).random(good_i.shape).astype(np.float32)

    def realism(images: np.ndarray) -> dict[str, float]:
        return by_name(realism_figures(
            AuditSet(train_i, train_l, features(train_i)), AuditSet(hold_i, hold_l, features(hold_i)),
            AuditSet(images, good_l, features(images)), label_names=["bg", "disc", "square"], spatial_dims=2, segment=lambda x: (np.asarray(x) > 0.3).astype(np.int64) + (np.asarray(x) > 0.7),
        ))

    good, bad = realism(good_i), realism(noise)
    for name in ("realism/fid_features", "realism/kid_features", "realism/mmd_gaussian_features",
                 "realism/intensity_w1_disc", "realism/histogram_distance_disc"):
        assert good[name] < bad[name], name
    assert good["realism/label_consistency_dice"] > bad["realism/label_consistency_dice"]


def test_verdict_and_utility() -> None:
    figures = utility_figures(dice_real=0.8, dice_synthetic=0.6, dice_both=0.82)
    assert verdict(figures, {"utility/dice_synthetic_only": {"min": 0.5}}) == (True, [])
    passed, reasons = verdict(figures, {"utility/dice_synthetic_only": {"min": 0.7}, "privacy/membership_auc": {"max": 0.6}})
    assert not passed and len(reasons) == 2
    assert "below the limit 0.7" in reasons[0] and "not computed" in reasons[1]


def test_report_embeds_figures_and_pictures(tmp_path: Path) -> None:
    picture = save_png(tmp_path / "p.png", np.ones((4, 4)))
    page = render_report(
        title="audit <x>", figures=utility_figures(dice_real=0.8, dice_synthetic=0.6, dice_both=0.82), passed=False,
        reasons=["privacy/memorised_count = 3 is above the limit 0"], pictures={"sheet": picture}, facts={"samples": "5"},
    )
    assert "audit &lt;x&gt;" in page and "FAIL" in page and "memorised_count" in page
    assert "dice_real_plus_synthetic" in page and "data:image/png;base64," in page


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_random_views_shape_and_variety(spatial_dims: int) -> None:
    x = torch.rand(4, 1, *([8] * spatial_dims))
    g = torch.Generator().manual_seed(0)
    v1, v2 = random_views(x, generator=g), random_views(x, generator=g)
    assert v1.shape == x.shape and not torch.allclose(v1, v2)


def test_nt_xent_prefers_matching_views() -> None:
    z = torch.randn(8, 16)
    assert nt_xent(z, z, temperature=0.2) < nt_xent(z, torch.randn(8, 16), temperature=0.2)


def test_encoder_learns_and_encodes() -> None:
    images, labels = blobs(16, seed=0)
    data = LabelledArrays(torch.from_numpy(images), torch.from_numpy(labels), [str(i) for i in range(16)], [])
    encoder = train_encoder(data, spatial_dims=2, channels=(8, 16), steps=3, batch_size=8)
    assert isinstance(encoder, FeatureEncoder)
    out = encode(encoder, data.images, batch_size=5)
    assert out.shape == (16, 16) and torch.isfinite(out).all()


def test_segmenter_learns_an_easy_task() -> None:
    """Intensity determines the label here; a short training reaches a high Dice."""
    from medsynth.metrics.segmentation import mean_dice

    images, labels = blobs(24, seed=0)
    data = LabelledArrays(torch.from_numpy(images), torch.from_numpy(labels), [str(i) for i in range(24)], [])
    model = train_segmenter(data, num_classes=3, spatial_dims=2, channels=(8, 16), steps=60, batch_size=8, lr=1e-2)
    test_i, test_l = blobs(8, seed=5)
    assert mean_dice(segment(model, torch.from_numpy(test_i)).numpy(), test_l, num_classes=3) > 0.7


def test_denoising_errors_are_deterministic_per_example() -> None:
    model = tiny_denoiser(2).eval()
    scheduler = DDPMScheduler(num_train_timesteps=10)
    x = torch.rand(5, 1, 8, 8)
    label = torch.randint(0, 3, (5, 1, 8, 8))
    errors = denoising_errors(model, x, label, scheduler, timesteps=[2, 7], batch_size=2)
    assert errors.shape == (5,)
    torch.testing.assert_close(errors, denoising_errors(model, x, label, scheduler, timesteps=[2, 7], batch_size=5))
    torch.testing.assert_close(errors[3:4], denoising_errors(model, x[3:4], label[3:4], scheduler, timesteps=[2, 7]))


@pytest.mark.parametrize("spatial_dims,encoder_dims,space", [(2, 2, "2d"), (3, 2, "2.5d"), (3, 3, "3d")])
def test_features_in_each_space(spatial_dims: int, encoder_dims: int, space: str) -> None:
    """One function measures images (2D), volumes slice by slice with a 2D encoder (2.5D) and whole volumes (3D)."""
    from medsynth.evaluation.instruments import feature_space, features

    torch.manual_seed(0)
    encoder = FeatureEncoder(spatial_dims=encoder_dims, channels=(8, 16)).eval()
    images = torch.rand(5, 1, *([8] * spatial_dims))
    measured = features(encoder, images.numpy(), batch_size=3)
    assert measured.space == space == feature_space(encoder, spatial_dims=spatial_dims)
    if space == "2.5d":
        assert measured.items.shape == (5, 3 * 16) and set(measured.planes) == {"sagittal", "coronal", "axial"}
        axial = measured.planes["axial"]
        assert axial.shape == (5 * 8, 16)
        # the last 16 columns are each volume's mean axial-slice feature
        np.testing.assert_allclose(measured.items[:, 32:], axial.reshape(5, 8, 16).mean(axis=1), rtol=1e-5, atol=1e-6)
    else:
        assert measured.planes == {}
        np.testing.assert_allclose(measured.items, encode(encoder, images).numpy(), rtol=1e-5, atol=1e-6)
    assert measured.items.dtype == np.float32


def test_utility_segmenters_are_trained_on_each_set() -> None:
    from medsynth.config.settings import SegmenterSettings
    from medsynth.evaluation.instruments import SEGMENTER_SETS, holdout_dice, train_segmenters

    def arrays(n: int, seed: int) -> LabelledArrays:
        images, labels = blobs(n, seed=seed)
        return LabelledArrays(torch.from_numpy(images), torch.from_numpy(labels), [f"{seed}_{i}" for i in range(n)], [])

    models = train_segmenters(SegmenterSettings(channels=[8, 16], steps=2, batch_size=4), real=arrays(8, 0),
                              synthetic=arrays(6, 1), num_classes=3, spatial_dims=2, seed=0, device="cpu")
    assert tuple(models) == SEGMENTER_SETS
    assert all(0.0 <= holdout_dice(m, arrays(4, 2), num_classes=3) <= 1.0 for m in models.values())


def test_evaluate_audits_only_the_generator_that_made_the_set(tiny_config, phantom) -> None:
    """evaluate takes the generator from synthetic/manifest.csv and refuses a changed, missing or mixed one."""
    import csv
    import json

    from medsynth import MedsynthError
    from medsynth.training import load_checkpoint, save_checkpoint
    from tests.conftest import phantom_overrides, run_stage

    cfg = tiny_config(*phantom_overrides(*phantom))
    run_stage("preprocess", cfg)
    checkpoint = run_stage("train", cfg)
    synthetic_manifest = run_stage("generate", cfg)
    body = json.loads(run_stage("evaluate", cfg).read_text())
    assert body["num_synthetic"] == 5 and set(body["label_intensity_stats"]) == {"train", "holdout", "synthetic"}
    assert {"privacy/membership_auc", "realism/fid_features", "utility/dice_real_plus_synthetic"} <= set(body["metrics"])
    assert body["verdict"]["limits"]["privacy/memorised_count"] == {"max": 0}
    out = Path(cfg.paths.evaluation)
    assert (out / "comparison.png").is_file() and (out / "most_similar_pairs.png").is_file()
    assert "medsynth evaluation: " + cfg.name in (out / "report.html").read_text()

    state = load_checkpoint(checkpoint)
    state["step"] = state["step"] + 1  # same weights, another file: not the generator that made the set
    save_checkpoint(checkpoint, state)
    with pytest.raises(MedsynthError, match="SHA-256") as err:
        run_stage("evaluate", cfg)
    assert str(checkpoint) in str(err.value) and "\n" not in str(err.value)
    Path(checkpoint).unlink()
    with pytest.raises(MedsynthError, match="checkpoint not found") as err:
        run_stage("evaluate", cfg)
    assert str(checkpoint) in str(err.value) and "\n" not in str(err.value)

    with open(synthetic_manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[1]["checkpoint"] = "elsewhere.pt"
    with open(synthetic_manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(MedsynthError, match="different generators"):
        run_stage("evaluate", cfg)
