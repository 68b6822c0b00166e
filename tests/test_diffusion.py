"""Loss, sampler and conditioning: one code path for 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from medsynth import ConfigError
from medsynth.diffusion import Denoiser, diffusion_loss, from_unit_range, sample, to_unit_range
from medsynth.diffusion.denoiser import network_channels

NUM_CLASSES = 3


def tiny_denoiser(spatial_dims: int) -> Denoiser:
    torch.manual_seed(0)
    network = DiffusionModelUNet(
        spatial_dims=spatial_dims, in_channels=1 + NUM_CLASSES, out_channels=1, channels=(8, 8),
        attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8,
    )
    return Denoiser(network, conditioning="mask", num_classes=NUM_CLASSES)


def batch(spatial_dims: int, n: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (n, 1, *([size] * spatial_dims))
    label = torch.randint(0, NUM_CLASSES, shape, generator=g)
    image = from_unit_range(label.float() / (NUM_CLASSES - 1))
    return image, label


SCHEDULERS = {
    "ddpm-epsilon": lambda d: DDPMScheduler(num_train_timesteps=10, prediction_type="epsilon"),
    "ddpm-sample": lambda d: DDPMScheduler(num_train_timesteps=10, prediction_type="sample"),
    "ddpm-v": lambda d: DDPMScheduler(num_train_timesteps=10, prediction_type="v_prediction"),
    "ddim-v": lambda d: DDIMScheduler(num_train_timesteps=10, prediction_type="v_prediction"),
    "rflow": lambda d: RFlowScheduler(num_train_timesteps=10, spatial_dim=d),
}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_loss_is_finite_and_differentiable(spatial_dims: int, kind: str) -> None:
    model = tiny_denoiser(spatial_dims)
    scheduler = SCHEDULERS[kind](spatial_dims)
    x0, label = batch(spatial_dims)
    loss = diffusion_loss(model, x0, label, scheduler, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sample_shape_range_and_per_seed_reproducibility(spatial_dims: int) -> None:
    """A sample depends only on its own seed and label map, not on the batch it was drawn in."""
    model = tiny_denoiser(spatial_dims).eval()
    scheduler = DDIMScheduler(num_train_timesteps=10, prediction_type="v_prediction")
    _, label = batch(spatial_dims, n=3)
    shape = (1, *label.shape[2:])
    together = sample(model, scheduler, label, seeds=[5, 6, 7], shape=shape, steps=4)
    assert together.shape == (3, 1, *label.shape[2:])
    assert together.min() >= -1.0 and together.max() <= 1.0
    alone = sample(model, scheduler, label[1:2], seeds=[6], shape=shape, steps=4)
    torch.testing.assert_close(alone, together[1:2], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["ddpm-epsilon", "ddim-v", "rflow"])
def test_every_sampler_returns_the_same_type(spatial_dims: int, kind: str) -> None:
    model = tiny_denoiser(spatial_dims).eval()
    _, label = batch(spatial_dims)
    out = sample(model, SCHEDULERS[kind](spatial_dims), label, seeds=[0, 1], shape=label.shape[1:], steps=5)
    assert isinstance(out, torch.Tensor) and out.shape == label.shape and torch.isfinite(out).all()


def test_rflow_target_and_noising() -> None:
    """Rectified flow: x_t = (1 - t/T) x0 + (t/T) eps, target x0 - eps; one exact Euler step recovers x0."""
    from medsynth.diffusion import prediction_target

    scheduler = RFlowScheduler(num_train_timesteps=10, spatial_dim=2)
    x0, eps = torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([5, 5])
    x_t = scheduler.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, 0.5 * x0 + 0.5 * eps)
    v = prediction_target(scheduler, x0, eps, t)
    torch.testing.assert_close(v, x0 - eps)
    scheduler.set_timesteps(1)
    x_next, _ = scheduler.step(v, 5, x_t, 0)
    torch.testing.assert_close(x_next, x0)


def test_condition_changes_the_prediction() -> None:
    """The label map reaches the network: a different map gives a different output."""
    model = tiny_denoiser(2).eval()
    with torch.no_grad():  # MONAI zero-initialises the output convolution; give it weights
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.1)
    x, label = batch(2, n=1)
    t = torch.tensor([5])
    assert not torch.allclose(model(x, t, label), model(x, t, (label + 1) % NUM_CLASSES))


def test_bad_options_fail_early() -> None:
    with pytest.raises(ConfigError, match="model.conditioning"):
        Denoiser(torch.nn.Identity(), conditioning="text", num_classes=3)
    with pytest.raises(ValueError, match="one seed per condition"):
        sample(tiny_denoiser(2), DDIMScheduler(num_train_timesteps=10), batch(2)[1], seeds=[1], shape=(1, 8, 8), steps=2)


def test_range_maps_are_inverse() -> None:
    x = torch.linspace(0, 1, 11)
    torch.testing.assert_close(to_unit_range(from_unit_range(x)), x)
    assert from_unit_range(torch.tensor(0.0)) == -1.0 and from_unit_range(torch.tensor(1.0)) == 1.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_joint_mode_generates_a_labelled_pair_from_noise(spatial_dims: int) -> None:
    """joint: image and one-hot label are one variable; split() recovers them; no label map is needed to sample."""
    mode = dict(conditioning="joint", image_channels=1, num_classes=NUM_CLASSES)
    in_channels, channels = network_channels(output="pair", **mode)
    assert channels == 1 + NUM_CLASSES and in_channels == channels
    network = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=channels, out_channels=channels, channels=(8, 8),
                                 attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    model = Denoiser(network, **mode).eval()
    image, label = batch(spatial_dims)
    x0 = model.to_sample(to_unit_range(image), label)
    assert x0.shape == (2, channels, *label.shape[2:]) and x0.min() == -1.0 and x0.max() == 1.0
    back_image, back_label = model.split(x0)
    torch.testing.assert_close(back_image, to_unit_range(image))
    assert torch.equal(back_label, label)
    assert model.condition(label) is None
    loss = diffusion_loss(model, x0, None, DDPMScheduler(num_train_timesteps=10), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    out = sample(model, DDIMScheduler(num_train_timesteps=10), None, seeds=[0, 1], shape=x0.shape[1:], steps=3)
    images, labels = model.split(out)
    assert images.shape == image.shape and labels.shape == label.shape
    assert int(labels.min()) >= 0 and int(labels.max()) < NUM_CLASSES


@pytest.mark.parametrize("group", ["ddpm", "ddim", "ddpm_sample", "rflow"])
def test_every_scheduler_group_builds_with_its_samplers(group: str) -> None:
    """Each conf/scheduler group builds from the allow-list with all its keys; a sampler takes the
    training schedule, and one for the other family is refused naming the key."""
    from medsynth.diffusion.generator import build_sampler, build_scheduler
    from tests.conftest import compose_config

    settings = compose_config([f"scheduler={group}", "scheduler.num_train_timesteps=10",
                               "evaluate.membership.timesteps=[5]"]).scheduler
    scheduler = build_scheduler(settings)
    assert type(scheduler).__name__ == settings._target_.rsplit(".", 1)[-1] and scheduler.num_train_timesteps == 10
    for key, value in settings.options().items():
        if key != "schedule":  # MONAI turns the schedule's name into betas
            assert getattr(scheduler, key, value) == value, key
    own, other = (["rflow"], ["ddim", "ddpm"]) if settings.is_flow else (["ddim", "ddpm"], ["rflow"])
    for name in ["auto", *own]:
        sampler = build_sampler(name, settings)
        assert sampler.num_train_timesteps == 10
        if not settings.is_flow:
            assert sampler.prediction_type == settings.prediction_type
    for name in other:
        with pytest.raises(ConfigError, match="generate.sampler"):
            build_sampler(name, settings)
