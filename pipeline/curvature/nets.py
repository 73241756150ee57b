"""Reference ``torch.nn.Module`` networks for the experiments: ordinary PyTorch code that minratio reaches
through the same path as a user's module (``model=torch model._target_=pipeline.curvature.nets.SmallCNN``), with
no closed-form Hessian — the Hessian comes from Hessian-vector products (:mod:`pipeline.curvature.hessian`)."""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """``len(channels)`` 3×3 convolutions (zero padding, tanh, 2×2 average pooling after each) on
    ``[n, in_channels, side, side]`` images, then a linear layer to ``n_classes`` outputs."""

    def __init__(self, in_channels: int = 3, side: int = 32, channels: tuple = (8, 8), n_classes: int = 10):
        super().__init__()
        layers, c = [], in_channels
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2)]
            c, side = out, side // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * side * side, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TanhMLP(nn.Module):
    """``in_features`` → ``hidden`` tanh layers → ``out_features``, as a module (no closed-form Hessian)."""

    def __init__(self, in_features: int, hidden: tuple = (32, 32), out_features: int = 1):
        super().__init__()
        layers, d = [], in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.net = nn.Sequential(*layers, nn.Linear(d, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
