"""Conditioning modes, classifier-free guidance, label-map generation, latent diffusion and
activation checkpointing: every mode x scheduler x 2D/3D for a step."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from medsynth import ConfigError
from medsynth.data import LabelledArrays
from medsynth.data.dataset import attribute_codes
from medsynth.data.manifest import Record
from medsynth.diffusion import Denoiser, diffusion_loss, sample
from medsynth.diffusion.denoiser import network_channels, network_options
from medsynth.diffusion.latent import decode_latents, latent_scale_factor
from medsynth.training.activation import enable_activation_checkpointing
from medsynth.config.settings import AutoencoderTrainingSettings
from medsynth.training.autoencoder import kl_divergence, train_autoencoder

NUM_CLASSES = 3
VOCABULARY = {"class": {"level": ["1", "2", "3"]}, "attributes": {"age": ["40-50", "60-70"], "sex": ["F", "M"]}}


def tiny_model(conditioning: str, spatial_dims: int, *, output: str | None = None, dropout: float = 0.0,
               autoencoder: torch.nn.Module | None = None, perturb: bool = True) -> Denoiser:
    """A 2-level 8-channel UNet wrapped for ``conditioning``; weights perturbed so outputs depend on inputs.

    Two channels per normalisation group: with one, group norm would cancel the per-channel offsets
    that carry the time and class embeddings.
    """
    torch.manual_seed(0)
    vocabulary = VOCABULARY.get(conditioning, {})
    output = output or ("pair" if conditioning == "joint" else "image")
    image_channels = autoencoder.latent_channels if autoencoder is not None else 1
    in_ch, out_ch = network_channels(conditioning=conditioning, output=output, image_channels=image_channels,
                                     num_classes=NUM_CLASSES)
    network = DiffusionModelUNet(
        spatial_dims=spatial_dims, in_channels=in_ch, out_channels=out_ch, channels=(8, 8),
        attention_levels=(False, True), num_res_blocks=1, norm_num_groups=4, num_head_channels=8,
        **network_options(conditioning=conditioning, vocabulary=vocabulary, context_dim=16),
    )
    model = Denoiser(network, conditioning=conditioning, num_classes=NUM_CLASSES, output=output, vocabulary=vocabulary,
                     context_dim=16, condition_dropout=dropout, autoencoder=autoencoder, image_channels=image_channels)
    if perturb:
        with torch.no_grad():
            for p in model.network.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def tiny_batch(spatial_dims: int, n: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, NUM_CLASSES, (n, 1, *[size] * spatial_dims), generator=g)
    image = label.float() / (NUM_CLASSES - 1)
    codes = torch.stack([torch.arange(n) % 2, (torch.arange(n) + 1) % 2], dim=1)
    return image, label, codes


SCHEDULERS = {
    "ddpm": lambda d: DDPMScheduler(num_train_timesteps=10, prediction_type="epsilon"),
    "ddim": lambda d: DDIMScheduler(num_train_timesteps=10, prediction_type="v_prediction"),
    "rflow": lambda d: RFlowScheduler(num_train_timesteps=10, spatial_dim=d),
}
MODES = ["mask", "joint", "class", "attributes"]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("conditioning", MODES)
def test_every_mode_and_scheduler_trains_a_step_and_samples(conditioning: str, scheduler: str, spatial_dims: int) -> None:
    model = tiny_model(conditioning, spatial_dims, dropout=0.2)
    image, label, codes = tiny_batch(spatial_dims, size=8 if spatial_dims == 2 else 4)
    codes = codes[:, : len(model.vocabulary)]
    sched = SCHEDULERS[scheduler](spatial_dims)
    condition = model.drop_condition(model.condition(label, codes), generator=torch.Generator().manual_seed(0))
    loss = diffusion_loss(model, model.to_sample(image, label), condition, sched, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.network.parameters() if p.requires_grad)
    guidance = 2.0 if conditioning in ("class", "attributes") else 1.0
    x = sample(model.eval(), sched, model.condition(label, codes), seeds=[0, 1], shape=model.sample_shape(image.shape[2:]),
               steps=3, guidance_scale=guidance)
    images, labels = model.split(x)
    assert images.shape == image.shape and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert (labels is not None) == (conditioning == "joint")


@pytest.mark.parametrize("conditioning", ["class", "attributes"])
def test_the_condition_changes_the_prediction(conditioning: str) -> None:
    model = tiny_model(conditioning, 2).eval()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([4])
    first = model(x, t, model.encode_attributes({k: v[0] for k, v in model.vocabulary.items()}))
    other = model(x, t, model.encode_attributes({k: v[-1] for k, v in model.vocabulary.items()}))
    assert not torch.allclose(first, other)


def test_guidance_extrapolates_from_the_unconditional_prediction() -> None:
    """With one DDIM step the sample is a linear function of the prediction, so guidance must equal
    uncond + w (cond - uncond) computed by hand; w = 1 is the plain conditional sample."""
    model = tiny_model("class", 2).eval()
    codes = torch.tensor([[2], [0]])
    shape = model.sample_shape((8, 8))
    plain = sample(model, DDIMScheduler(num_train_timesteps=10, prediction_type="sample", clip_sample=False), codes,
                   seeds=[3, 4], shape=shape, steps=1)
    unguided = sample(model, DDIMScheduler(num_train_timesteps=10, prediction_type="sample", clip_sample=False),
                      model.null_condition(codes), seeds=[3, 4], shape=shape, steps=1)
    guided = sample(model, DDIMScheduler(num_train_timesteps=10, prediction_type="sample", clip_sample=False), codes,
                    seeds=[3, 4], shape=shape, steps=1, guidance_scale=3.0)
    torch.testing.assert_close(guided, unguided + 3.0 * (plain - unguided), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="guidance"):
        sample(tiny_model("mask", 2).eval(), DDIMScheduler(num_train_timesteps=10), torch.zeros(1, 1, 8, 8, dtype=torch.long),
               seeds=[0], shape=(1, 8, 8), steps=1, guidance_scale=2.0)


def test_condition_dropout_rate_and_determinism() -> None:
    model = tiny_model("attributes", 2, dropout=0.2)
    codes = torch.zeros(4000, 2, dtype=torch.long)
    dropped = model.drop_condition(codes, generator=torch.Generator().manual_seed(0))
    again = model.drop_condition(codes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    null = torch.tensor([2, 2])
    per_attribute = (dropped == null).float().mean(0)
    # P(dropped) = 1 - (1 - p_attribute)(1 - p_whole) = 0.36 for p = 0.2
    assert torch.all((per_attribute - 0.36).abs() < 0.03), per_attribute
    assert 0.17 < float((dropped == null).all(1).float().mean()) < 0.27  # whole condition gone (0.2 + 0.8 * 0.04)
    assert torch.equal(tiny_model("mask", 2, dropout=0.2).drop_condition(codes, generator=torch.Generator()), codes)


def test_prompts_are_encoded_and_checked() -> None:
    model = tiny_model("attributes", 2)
    assert model.encode_attributes({"sex": "M"}).tolist() == [[2, 1]]  # age not given -> its null index
    assert model.encode_attributes({"age": "60-70", "sex": "F"}).tolist() == [[1, 0]]
    with pytest.raises(ConfigError, match="not one the model was trained with"):
        model.encode_attributes({"sex": "X"})
    with pytest.raises(ConfigError, match="unknown attribute"):
        model.encode_attributes({"region": "brain"})
    with pytest.raises(ConfigError, match="takes no attributes"):
        tiny_model("mask", 2).encode_attributes({"sex": "F"})


def test_record_attributes_become_codes() -> None:
    records = [Record("a", "a", "train", "", [1], [1.0], [], "", attributes={"sex": "M", "age": "40-50"}),
               Record("b", "b", "train", "", [1], [1.0], [], "", attributes={"sex": "F"})]
    codes = attribute_codes(records, VOCABULARY["attributes"])
    assert codes.tolist() == [[0, 1], [2, 0]]
    with pytest.raises(Exception, match="not in the model's vocabulary"):
        attribute_codes(records, {"sex": ["F"]})


def test_mode_errors_name_the_config_key() -> None:
    with pytest.raises(ConfigError, match="model.output=image"):
        tiny_model("mask", 2, output="pair")
    with pytest.raises(ConfigError, match="exactly one attribute"):
        network_options(conditioning="class", vocabulary={"a": ["x"], "b": ["y"]}, context_dim=8)
    with pytest.raises(ConfigError, match="per-case attributes"):
        network_options(conditioning="attributes", vocabulary={}, context_dim=8)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_label_map_generator(spatial_dims: int) -> None:
    """output=label: the diffusion variable is the one-hot label map; samples split into label maps only."""
    model = tiny_model("class", spatial_dims, output="label").eval()
    _, label, codes = tiny_batch(spatial_dims, size=8 if spatial_dims == 2 else 4)
    x0 = model.to_sample(torch.zeros(label.shape), label)
    assert x0.shape[1] == NUM_CLASSES and torch.equal(model.split(x0)[1], label) and model.split(x0)[0] is None
    x = sample(model, DDIMScheduler(num_train_timesteps=10), codes[:, :1], seeds=[0, 1], shape=x0.shape[1:], steps=2,
               guidance_scale=2.0)
    image, generated = model.split(x)
    assert image is None and generated.shape == label.shape and int(generated.max()) < NUM_CLASSES


def tiny_autoencoder(spatial_dims: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                         num_res_blocks=1, norm_num_groups=8, attention_levels=(False, False),
                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_latent_diffusion_encodes_and_decodes_around_the_denoiser(spatial_dims: int) -> None:
    ae = tiny_autoencoder(spatial_dims)
    model = tiny_model("mask", spatial_dims, autoencoder=ae)
    image, label, _ = tiny_batch(spatial_dims, size=8)
    x0 = model.to_sample(image, label)
    assert x0.shape == (2, 2, *[4] * spatial_dims) == (2, *model.sample_shape(image.shape[2:]))
    loss = diffusion_loss(model, x0, label, RFlowScheduler(num_train_timesteps=10, spatial_dim=spatial_dims),
                          generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())  # the autoencoder stays frozen
    decoded, none = model.eval().split(x0)
    assert decoded.shape == image.shape and none is None
    with pytest.raises(ConfigError, match="pixel space"):
        tiny_model("joint", spatial_dims, autoencoder=tiny_autoencoder(spatial_dims))


def test_tiled_decode_covers_the_volume() -> None:
    ae = tiny_autoencoder(3).eval()
    z = torch.randn(1, 2, 8, 8, 8)
    whole = decode_latents(ae, z)
    torch.testing.assert_close(decode_latents(ae, z, tile=[8, 8, 8]), whole)  # a tile as large as z: one pass
    tiled = decode_latents(ae, z, tile=[4, 4, 4])
    assert tiled.shape == whole.shape == (1, 1, 16, 16, 16) and torch.isfinite(tiled).all()


def test_autoencoder_learns_and_latent_scale_normalises() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 1, 16, 16).round()  # binary patterns
    data = LabelledArrays(images, torch.zeros_like(images, dtype=torch.long), ["a", "b", "c", "d"], [])
    ae = tiny_autoencoder(2)
    for adversarial in (0.0, 0.1):
        result = train_autoencoder(ae, data, settings=AutoencoderTrainingSettings(
            max_steps=40, batch_size=4, lr=3e-3, adversarial_weight=adversarial, flip_dims=[]),
            device=torch.device("cpu"), progress=False)
        assert sum(result.losses[-5:]) < sum(result.losses[:5]), result.losses
    scale = latent_scale_factor(ae.eval(), images * 2 - 1)
    with torch.no_grad():
        z = ae.encode(images * 2 - 1)[0] * scale
    assert abs(float(z.std()) - 1.0) < 1e-3
    assert float(kl_divergence(torch.zeros(2, 3), torch.ones(2, 3))) == 0.0


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = tiny_model("attributes", 2)
    checkpointed = copy.deepcopy(model)
    assert enable_activation_checkpointing(checkpointed.network) > 0
    image, label, codes = tiny_batch(2)
    for m in (model, checkpointed):
        diffusion_loss(m, m.to_sample(image, label), codes, DDPMScheduler(num_train_timesteps=10),
                       generator=torch.Generator().manual_seed(0)).backward()
    for a, b in zip(model.parameters(), checkpointed.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
    assert list(model.state_dict()) == list(checkpointed.state_dict())  # checkpoints stay interchangeable
    with pytest.raises(ValueError, match="cannot checkpoint"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
