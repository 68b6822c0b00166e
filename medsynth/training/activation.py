"""Activation (gradient) checkpointing for networks whose blocks do not offer it themselves."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_LISTS: tuple[str, ...] = ("down_blocks", "middle_block", "up_blocks")
"""Attributes of MONAI's ``DiffusionModelUNet`` that hold its blocks."""


def enable_activation_checkpointing(network: nn.Module, *, blocks: Sequence[str] = BLOCK_LISTS) -> int:
    """Recompute each block's activations in the backward pass instead of storing them.

    Memory for activations drops to about one block's worth at the cost of a second forward
    pass, which is what lets a 3D UNet train at clinical resolution. The blocks keep their
    parameter names, so checkpoints and EMA copies are unaffected; in eval mode or without
    gradients a block runs normally.

    Args:
        network: The network, e.g. MONAI's ``DiffusionModelUNet``.
        blocks: Names of the attributes holding a block or a list of blocks.

    Returns:
        Number of blocks changed.

    Raises:
        ValueError: If ``network`` has none of ``blocks``.
    """
    found = [getattr(network, name) for name in blocks if hasattr(network, name)]
    if not found:
        raise ValueError(f"{type(network).__name__} has none of {list(blocks)}; cannot checkpoint its activations")
    changed = 0
    for holder in found:
        for block in holder if isinstance(holder, nn.ModuleList) else [holder]:
            if not getattr(type(block), "_activation_checkpointed", False):
                block.__class__ = _checkpointed(type(block))
                changed += 1
    return changed


_CHECKPOINTED: dict[type[nn.Module], type[nn.Module]] = {}


def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose forward is recomputed in the backward pass while training (one per class)."""
    if cls in _CHECKPOINTED:
        return _CHECKPOINTED[cls]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        parent = functools.partial(cls.forward, self)
        if self.training and any(p.requires_grad for p in self.parameters()):
            return checkpoint(parent, *args, use_reentrant=False, **kwargs)
        return parent(*args, **kwargs)

    subclass = type(
        cls.__name__,
        (cls,),
        {"forward": forward, "_activation_checkpointed": True, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )
    _CHECKPOINTED[cls] = subclass
    return subclass
