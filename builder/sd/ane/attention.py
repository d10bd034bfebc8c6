"""Multi-head attention on (B, C, 1, S) tensors, in the three forms a recipe can choose.

Inputs are projected queries (B, heads*d, 1, Sq), keys and values (B, heads*d, 1, Sk); head h owns
channels [h*d, (h+1)*d), as in diffusers. The output is
(B, heads*d, 1, Sq). ORIGINAL suits the GPU. The SPLIT_EINSUM forms give each head its own small
ops and put keys on axis 1 so softmax reduces over channels of a (B, Sk, 1, Sq) tensor, which the
Neural Engine handles well; SPLIT_EINSUM_V2 further cuts query sequences of 512 or more into
512-long chunks, so each score tensor has at most 512 query columns however large the image.
"""

from __future__ import annotations

import torch

from builder.recipe.enums import Attention
from builder.recipe.rules import SPLIT_EINSUM_V2_CHUNK


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, attention: Attention, scale: float
) -> torch.Tensor:
    """Softmax attention of `q` over `k`/`v` with the chosen implementation.

    The scale multiplies the scores, not the queries: scaled queries would be folded by the
    converter into the query projection's weights, and the saved weight would no longer be the
    checkpoint's, breaking the name-for-name map from Core ML weights back to torch parameters.
    """
    if attention is Attention.ORIGINAL:
        return _batched(q, k, v, heads, scale)
    chunk = _query_chunk(q.shape[3]) if attention is Attention.SPLIT_EINSUM_V2 else None
    return _split_heads(q, k, v, heads, chunk, scale)


def _batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    batch, channels, _, queries = q.shape
    head_dim = channels // heads
    q = q.view(batch, heads, head_dim, queries).transpose(2, 3)  # (B, h, Sq, d)
    k = k.view(batch, heads, head_dim, -1)  # (B, h, d, Sk)
    v = v.view(batch, heads, head_dim, -1)  # (B, h, d, Sk)
    weights = (torch.matmul(q, k) * scale).softmax(dim=-1)  # (B, h, Sq, Sk)
    return torch.matmul(v, weights.transpose(2, 3)).view(batch, channels, 1, queries)


def _query_chunk(length: int) -> int | None:
    """Chunk length for a query sequence, or None when it is too short to need chunks."""
    if length < SPLIT_EINSUM_V2_CHUNK:
        return None
    if length % SPLIT_EINSUM_V2_CHUNK:
        raise ValueError(
            f"SPLIT_EINSUM_V2 cuts query sequences of {SPLIT_EINSUM_V2_CHUNK} tokens or more into "
            f"{SPLIT_EINSUM_V2_CHUNK}-token chunks; a sequence of {length} tokens is not a multiple of "
            f"{SPLIT_EINSUM_V2_CHUNK} (choose a latent size whose attention lengths are)"
        )
    return SPLIT_EINSUM_V2_CHUNK


def _split_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, chunk: int | None, scale: float
) -> torch.Tensor:
    head_dim = q.shape[1] // heads
    keys = k.transpose(1, 3)  # (B, Sk, 1, C): one transpose shared by every head
    outputs = []
    for head in range(heads):
        channels = slice(head * head_dim, (head + 1) * head_dim)
        q_head, k_head, v_head = q[:, channels], keys[..., channels], v[:, channels]
        pieces = [q_head] if chunk is None else list(q_head.split(chunk, dim=3))
        results = [_one_head(piece, k_head, v_head, scale) for piece in pieces]
        outputs.append(results[0] if len(results) == 1 else torch.cat(results, dim=3))
    return torch.cat(outputs, dim=1)


def _one_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, d, 1, Sq), k (B, Sk, 1, d), v (B, d, 1, Sk) -> (B, d, 1, Sq)."""
    weights = (torch.einsum("bchq,bkhc->bkhq", q, k) * scale).softmax(dim=1)  # (B, Sk, 1, Sq)
    return torch.einsum("bkhq,bchk->bchq", weights, v)
