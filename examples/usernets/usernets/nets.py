"""Plain PyTorch modules, written with no knowledge of minratio."""
from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """in_features → hidden (tanh) → out_features; images are flattened first."""

    def __init__(self, in_features: int = 16, hidden: int = 8, out_features: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Block(nn.Module):
    """A residual block: x + conv(bn(tanh(conv(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.tanh(self.bn(self.conv1(x))))


class SmallResNet(nn.Module):
    """A stem convolution, ``blocks`` residual blocks with BatchNorm, global average pooling, a linear head.
    Inputs ``[n, in_channels, H, W]``."""

    def __init__(self, in_channels: int = 1, width: int = 4, blocks: int = 1, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.tanh(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))
