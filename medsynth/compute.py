"""How the networks of generation and of the audit run on a device: number format and memory layout.

``precision: auto`` (``generate.precision``, ``evaluate.precision``) runs them under bf16 autocast
where the device computes bf16 natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16) and
in float32 elsewhere. What that costs in accuracy and gains in time is measured in
docs/benchmarks.md ("Generate and evaluate on the CPU").
"""

from __future__ import annotations

from typing import Literal

import torch

PRECISIONS = ("auto", "fp32", "bf16")
"""What a ``precision`` setting may say."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively, so that bf16 autocast pays off there.

    Args:
        device: A CUDA or CPU device.

    Returns:
        True for a CUDA GPU with bf16 support and for a CPU with AMX tiles or AVX512-BF16; False
        otherwise (there bf16 is emulated and slower than float32).
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch's own probes of the CPU's instruction sets (private: ones a torch version lacks read as no)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(name: str, device: torch.device, *, key: str = "precision") -> Literal["fp32", "bf16"]:
    """The number format a ``precision`` setting means on ``device``.

    Args:
        name: ``auto`` (bf16 where :func:`native_bf16`, else fp32), ``fp32`` or ``bf16``.
        device: Where the networks run.
        key: The setting's name, for the error message.

    Returns:
        ``fp32`` or ``bf16``.

    Raises:
        ValueError: For another name.
    """
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name not in ("fp32", "bf16"):
        raise ValueError(f"{key} must be one of {list(PRECISIONS)}, got {name!r}")
    return "bf16" if name == "bf16" else "fp32"


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """A context that runs the networks in ``precision`` (``fp32`` or ``bf16``) on ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def layout(spatial_dims: int) -> torch.memory_format:
    """The memory layout convolutions of ``spatial_dims`` dimensions run fastest in.

    2D networks and their images are kept channels-last (NHWC): oneDNN on the CPU and tensor
    cores on a GPU convolve that layout without reordering each call. 3D ones stay contiguous.
    """
    return torch.channels_last if spatial_dims == 2 else torch.contiguous_format
