"""Peak signal-to-noise ratio as Apple's converter measures it, so our figures compare with theirs."""

from __future__ import annotations

import math

import torch

# Apple's formula: peak = max |reference|, noise = RMS of the difference, both padded by epsilons
# so identical tensors give a large finite number instead of infinity.
_PEAK_EPS = 1e-5
_NOISE_EPS = 1e-10


def psnr(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of `candidate` against `reference` (same shape)."""
    if candidate.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(candidate.shape)} vs {tuple(reference.shape)}")
    reference = reference.detach().double()
    delta = candidate.detach().double() - reference
    peak = reference.abs().max().item()
    rms = math.sqrt(delta.pow(2).mean().item())
    return 20 * math.log10((peak + _PEAK_EPS) / (rms + _NOISE_EPS))
