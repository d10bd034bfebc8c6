"""How a diffusers Transformer2DModel's weights become a ConvTransformer2D's.

Two rules, nothing implicit: a few submodules are renamed, and every 2-D linear weight
(out, in) becomes a 1x1 convolution weight (out, in, 1, 1). Everything else (norms, biases,
SD 1.x's convolution projections) keeps its key and shape. Loading is strict, so a weight this
mapping misses fails loudly instead of staying at its initial value.
"""

from __future__ import annotations

import torch

# diffusers submodule path -> ConvTransformer2D path, matched as a key's dotted segment.
_RENAMES: tuple[tuple[str, str], ...] = (
    (".to_out.0.", ".to_out."),  # to_out is [Linear, Dropout] in diffusers
    (".ff.net.0.proj.", ".ff.project_in."),  # GEGLU's projection (value and gate halves)
    (".ff.net.2.", ".ff.project_out."),
)


def conv_key(key: str) -> str:
    """The ConvTransformer2D key holding diffusers' `key`."""
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def _conv_weight(tensor: torch.Tensor) -> torch.Tensor:
    """A linear weight (out, in) as a 1x1 convolution weight; other tensors unchanged.

    Returns a view, so the converted weights share the diffusers module's memory.
    """
    return tensor[:, :, None, None] if tensor.dim() == 2 else tensor


def conv_state_dict(transformer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Transformer2DModel's state dict, keyed and shaped for ConvTransformer2D."""
    return {conv_key(key): _conv_weight(tensor) for key, tensor in transformer_state.items()}
