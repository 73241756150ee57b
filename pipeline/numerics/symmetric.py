"""Dense symmetric matrices: symmetrising one built from rounded products, in place.

Numerics only: plain PyTorch on ``[..., N, N]`` tensors, nothing of models or losses.
"""
from __future__ import annotations

import torch


def symmetrize_(H: torch.Tensor) -> torch.Tensor:
    """H ← (H + Hᵀ)/2 in place for ``[..., N, N]``, one block pair at a time, so the temporaries are
    2 blocks of (N/8)² rather than a second N×N matrix. Rounding makes the HVP build slightly
    asymmetric (~1e-16 relative); eigh and LDLᵀ would otherwise read only one triangle."""
    n = H.shape[-1]
    block = max(512, -(-n // 8))
    for i in range(0, n, block):
        for j in range(0, i + 1, block):
            lower, upper = H[..., i:i + block, j:j + block], H[..., j:j + block, i:i + block]
            avg = (lower + upper.transpose(-1, -2)).mul_(0.5)
            lower.copy_(avg)
            upper.copy_(avg.transpose(-1, -2))
    return H
