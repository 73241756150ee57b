"""A user's data: a function returning (X, Y) tensors."""
from __future__ import annotations

import torch


def blobs(n: int = 128, side: int = 4, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` one-channel ``side``×``side`` images ``[n, 1, side, side]``: Gaussian noise around one random
    template per class; labels ``[n]`` int64."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 1, side, side, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return templates[labels] + 0.5 * torch.randn(n, 1, side, side, generator=g), labels
