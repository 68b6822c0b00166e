"""A network wrapped with its conditioning, so loss, sampler, EMA and checkpoints see one module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsynth import ConfigError
from medsynth.config.modes import (  # noqa: F401  (re-exported: the modes belong to the denoiser's API)
    CONDITIONING_MODES,
    GUIDED_MODES,
    OUTPUTS,
    check_mode,
    default_output,
    parse_prompt,
)
from medsynth.diffusion.latent import decode_latents


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map model-space intensities in [-1, 1] to dataset intensities in [0, 1]."""
    return (x + 1.0) * 0.5


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map dataset intensities in [0, 1] to the model's [-1, 1]."""
    return x * 2.0 - 1.0


def network_channels(*, conditioning: str, output: str, image_channels: int, num_classes: int) -> tuple[int, int]:
    """``(in_channels, out_channels)`` the wrapped network needs.

    The network's output is the diffusion variable: the image, the one-hot label map, or both.
    ``mask`` models also see the one-hot label map as input channels.
    """
    check_mode(conditioning, output)
    generated = {"image": image_channels, "label": num_classes, "pair": image_channels + num_classes}[output]
    return generated + (num_classes if conditioning == "mask" else 0), generated


def network_options(*, conditioning: str, vocabulary: Mapping[str, Sequence[str]], context_dim: int) -> dict[str, Any]:
    """Keyword arguments of MONAI's ``DiffusionModelUNet`` that carry a ``class`` or ``attributes`` condition.

    ``class`` uses the network's class embedding (one extra class index is the dropped condition);
    ``attributes`` uses cross-attention to one token per attribute.
    """
    if conditioning == "class":
        (values,) = _vocabulary_for(conditioning, vocabulary).values()
        return {"num_class_embeds": len(values) + 1}
    if conditioning == "attributes":
        _vocabulary_for(conditioning, vocabulary)
        return {"with_conditioning": True, "cross_attention_dim": context_dim}
    return {}


class Denoiser(nn.Module):
    """A diffusion network plus the rule that ties it to its condition.

    Conditioning (what the network is told):

    - ``mask``: the label map, one-hot encoded, is concatenated to the noisy input; the network
      learns an image *for a given label map*.
    - ``joint``: nothing; image and one-hot label map (scaled to [-1, 1]) are one diffusion
      variable, so a *labelled pair comes from noise* and no patient's label map is reused.
    - ``class``: one per-case attribute (the class) through the network's class embedding.
    - ``attributes``: several per-case attributes (age band, sex, region, ...), each a learned
      token the network attends to by cross-attention: medsynth's prompt.
    - ``none``: nothing (an unconditional model, e.g. a label-map generator).

    Output (the diffusion variable): ``image``, ``label`` (a label-map generator) or ``pair``.
    ``class`` and ``attributes`` conditions are integer codes, one column per attribute, with the
    value's index in the vocabulary; index ``len(values)`` means "not given" and is what condition
    dropout substitutes during training, so classifier-free guidance can contrast the two.

    With an ``autoencoder`` (latent diffusion), images are diffused as ``latent_scale`` times the
    autoencoder's latent mean; :meth:`to_sample` encodes and :meth:`split` decodes.

    Args:
        network: Maps ``(x, timesteps[, context | class_labels])`` to the diffusion variable,
            e.g. MONAI's ``DiffusionModelUNet`` built with :func:`network_channels` and
            :func:`network_options`.
        conditioning: One of :data:`CONDITIONING_MODES`.
        num_classes: Number of label values including background.
        image_channels: Channels of the image (of the latent with an autoencoder).
        output: One of :data:`OUTPUTS`; default :func:`default_output`.
        vocabulary: Attribute name -> its values, for ``class`` (one name) and ``attributes``.
        context_dim: Width of the attribute tokens (the network's ``cross_attention_dim``).
        condition_dropout: Probability that training drops a condition (per attribute, and the
            whole condition), for classifier-free guidance.
        autoencoder: A trained MONAI ``AutoencoderKL`` for latent diffusion; frozen.
        latent_scale: Factor that brings the latents to unit variance.
        decode_tile: Latent-grid tile size for decoding volumes that do not fit in one pass.
    """

    network: nn.Module
    autoencoder: Any  # MONAI's AutoencoderKL (encode, decode, encoder.channels), or None
    latent_scale: torch.Tensor

    def __init__(
        self,
        network: nn.Module,
        *,
        conditioning: str,
        num_classes: int,
        image_channels: int = 1,
        output: str | None = None,
        vocabulary: Mapping[str, Sequence[str]] | None = None,
        context_dim: int = 64,
        condition_dropout: float = 0.0,
        autoencoder: nn.Module | None = None,
        latent_scale: float = 1.0,
        decode_tile: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        output = output or default_output(conditioning)
        check_mode(conditioning, output)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one label), got {num_classes}")
        if not 0.0 <= condition_dropout < 1.0:
            raise ConfigError(f"model.condition_dropout must be in [0, 1), got {condition_dropout}")
        if autoencoder is not None and output != "image":
            raise ConfigError(f"latent diffusion generates images only; model.output={output} needs pixel space")
        self.network = network
        self.conditioning = conditioning
        self.output = output
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.condition_dropout = condition_dropout
        self.vocabulary = {k: [str(v) for v in vs] for k, vs in _vocabulary_for(conditioning, vocabulary or {}).items()}
        self.attribute_tokens = (
            nn.ModuleList(nn.Embedding(len(values) + 1, context_dim) for values in self.vocabulary.values())
            if conditioning == "attributes"
            else nn.ModuleList()
        )
        self.autoencoder = autoencoder
        if autoencoder is not None:
            autoencoder.requires_grad_(False).eval()
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))
        self.decode_tile = list(decode_tile) if decode_tile else None

    @property
    def sample_channels(self) -> int:
        """Channels of this model's diffusion variable."""
        return network_channels(
            conditioning=self.conditioning, output=self.output, image_channels=self.image_channels, num_classes=self.num_classes
        )[1]

    def sample_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """``(C, *spatial)`` of the diffusion variable for images of spatial shape ``image_shape``
        (smaller by the autoencoder's downsampling for a latent model)."""
        factor = 2 ** (len(self.autoencoder.encoder.channels) - 1) if self.autoencoder is not None else 1
        return (self.sample_channels, *(int(s) // factor for s in image_shape))

    def train(self, mode: bool = True) -> Denoiser:
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen: its normalisation statistics stay as trained
        return self

    # --- the diffusion variable ------------------------------------------------------------------

    def to_sample(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The clean diffusion variable x0 for ``image`` in [0, 1] and its ``label`` map."""
        parts = []
        if self.output in ("image", "pair"):
            parts.append(self._encode(image))
        if self.output in ("label", "pair"):
            parts.append(from_unit_range(self._one_hot(label, image.dtype)))
        return torch.cat(parts, dim=1)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A generated sample as ``(image in [0, 1] or None, label map or None)``.

        Generated labels are the argmax of their channels.
        """
        image = label = None
        if self.output in ("image", "pair"):
            image = self._decode(x[:, : self.image_channels])
        if self.output in ("label", "pair"):
            label = x[:, -self.num_classes :].argmax(dim=1, keepdim=True)
        return image, label

    # --- conditions ------------------------------------------------------------------------------

    def condition(self, label: torch.Tensor | None, codes: torch.Tensor | None = None) -> torch.Tensor | None:
        """What the network is told besides the noisy sample.

        Args:
            label: ``(N, 1, *spatial)`` label maps (``mask`` needs them).
            codes: ``(N, A)`` attribute codes in this model's vocabulary order.

        Returns:
            The label maps for ``mask``, the codes for ``class`` / ``attributes``, else ``None``.
        """
        if self.conditioning == "mask":
            if label is None:
                raise ValueError("mask conditioning needs label maps")
            return label
        if self.conditioning in GUIDED_MODES:
            if codes is None or codes.shape[1] != len(self.vocabulary):
                raise ValueError(f"{self.conditioning} conditioning needs codes for {list(self.vocabulary)}")
            return codes
        return None

    def null_condition(self, codes: torch.Tensor) -> torch.Tensor:
        """The same codes with every attribute "not given": the unconditional branch of guidance."""
        if self.conditioning not in GUIDED_MODES:
            raise ConfigError(f"guidance needs model.conditioning in {GUIDED_MODES}, this model uses {self.conditioning!r}")
        return self._null_codes(codes.shape[0], codes.device)

    def drop_condition(self, codes: torch.Tensor | None, *, generator: torch.Generator) -> torch.Tensor | None:
        """Condition dropout for classifier-free guidance; other conditions pass through unchanged.

        Each attribute is dropped with probability ``condition_dropout`` and, independently, the
        whole condition with the same probability, so both partial prompts and no prompt are learnt.
        """
        if self.conditioning not in GUIDED_MODES or self.condition_dropout == 0.0 or codes is None:
            return codes
        n, a = codes.shape
        p = self.condition_dropout
        drop = (torch.rand(n, a, generator=generator) < p) | (torch.rand(n, 1, generator=generator) < p)
        return torch.where(drop.to(codes.device), self._null_codes(n, codes.device), codes)

    def encode_attributes(self, values: Mapping[str, str]) -> torch.Tensor:
        """Codes ``(1, A)`` for a prompt such as ``{"sex": "F", "age": "60-70"}``; unnamed attributes are "not given".

        Raises:
            ConfigError: For an attribute or value the model was not trained with.
        """
        if self.conditioning not in GUIDED_MODES:
            raise ConfigError(f"this model ({self.conditioning!r} conditioning) takes no attributes")
        unknown = sorted(set(values) - set(self.vocabulary))
        if unknown:
            raise ConfigError(f"unknown attribute(s) {unknown}; the model knows {list(self.vocabulary)}")
        codes = []
        for key, known in self.vocabulary.items():
            value = values.get(key)
            if value is not None and str(value) not in known:
                raise ConfigError(f"attribute {key}={value!r} is not one the model was trained with: {known}")
            codes.append(known.index(str(value)) if value is not None else len(known))
        return torch.tensor([codes], dtype=torch.long)

    # --- the network -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the scheduler's target for noisy samples ``x`` at ``timesteps``.

        Args:
            x: ``(N, C, *spatial)`` noisy samples (C = :attr:`sample_channels`).
            timesteps: ``(N,)`` integer timesteps.
            condition: What :meth:`condition` returns: label maps ``(N, 1, *spatial)`` (resized to
                ``x``'s grid when it is a latent grid) or codes ``(N, A)``.

        Returns:
            ``(N, C, *spatial)`` prediction.
        """
        if condition is None:
            if self.conditioning in ("mask", *GUIDED_MODES):
                raise ValueError(f"{self.conditioning} conditioning needs a condition")
            return self.network(x, timesteps)
        if self.conditioning == "mask":
            one_hot = self._one_hot(condition, x.dtype)
            if one_hot.shape[2:] != x.shape[2:]:
                one_hot = F.interpolate(one_hot, size=x.shape[2:], mode="area")  # label fractions per latent voxel
            return self.network(torch.cat([x, one_hot], dim=1), timesteps)
        if self.conditioning == "class":
            return self.network(x, timesteps, class_labels=condition[:, 0])
        if self.conditioning == "attributes":
            tokens = torch.stack([embed(condition[:, k]) for k, embed in enumerate(self.attribute_tokens)], dim=1)
            return self.network(x, timesteps, context=tokens.to(x.dtype))
        return self.network(x, timesteps)

    # --- helpers ---------------------------------------------------------------------------------

    def _one_hot(self, label: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.one_hot(label[:, 0].long(), self.num_classes).movedim(-1, 1).to(dtype)

    def _null_codes(self, n: int, device: torch.device) -> torch.Tensor:
        nulls = torch.tensor([len(values) for values in self.vocabulary.values()], device=device)
        return nulls.expand(n, -1).clone()

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return from_unit_range(image)
        with torch.no_grad():
            z_mu, _ = self.autoencoder.encode(from_unit_range(image))
        return z_mu * self.latent_scale

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return to_unit_range(z).clamp(0.0, 1.0)
        return to_unit_range(decode_latents(self.autoencoder, z / self.latent_scale, tile=self.decode_tile)).clamp(0.0, 1.0)


def _vocabulary_for(conditioning: str, vocabulary: Mapping[str, Sequence[str]]) -> Mapping[str, Sequence[str]]:
    """The vocabulary a mode uses, checked: one attribute for ``class``, at least one for ``attributes``."""
    if conditioning not in GUIDED_MODES:
        return {}
    if conditioning == "class" and len(vocabulary) != 1:
        raise ConfigError(f"class conditioning needs exactly one attribute (model.class_key), got {list(vocabulary)}")
    if not vocabulary or any(len(values) == 0 for values in vocabulary.values()):
        raise ConfigError(
            f"{conditioning} conditioning needs per-case attributes in the dataset manifest; got {dict(vocabulary)}. "
            "Give them with data.attributes (a CSV) or data.level_bands"
        )
    return vocabulary
