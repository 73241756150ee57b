"""Stage 4 — models: MLPs written as pure functions of one flat parameter vector.

A flat ``theta`` of shape ``[n_params]`` is what the Hessian is taken with respect to, so the model is a
function ``forward(theta, X) -> [n, out_dim]`` rather than an ``nn.Module``; it works under ``torch.func``
transforms (grad, jvp, vmap over many parameter vectors at once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softplus": F.softplus,
    "swish": F.silu,
    "linear": lambda x: x,
}


@dataclass(frozen=True)
class MLP:
    """``depth`` hidden layers of ``width`` units between ``in_dim`` inputs and ``out_dim`` outputs."""

    in_dim: int
    out_dim: int
    depth: int = 1
    width: int = 8
    activation: str = "tanh"
    bias: bool = True

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        for name in ("in_dim", "out_dim", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLP {name} must be ≥ 1, got {getattr(self, name)}")

    @property
    def layer_dims(self) -> list[tuple[int, int]]:
        dims = [self.in_dim] + [self.width] * self.depth + [self.out_dim]
        return list(zip(dims[:-1], dims[1:]))

    @property
    def n_params(self) -> int:
        return sum(i * o + (o if self.bias else 0) for i, o in self.layer_dims)

    def init(self, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A flat ``[n_params]`` vector, weights ~ U(±1/√fan_in) as in ``nn.Linear``; seeded, CPU."""
        g = torch.Generator().manual_seed(int(seed))
        parts = []
        for fan_in, fan_out in self.layer_dims:
            bound = 1.0 / math.sqrt(fan_in)
            parts.append((torch.rand(fan_in * fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            if self.bias:
                parts.append((torch.rand(fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        return torch.cat(parts).to(dtype)

    def forward(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Outputs ``[n, out_dim]`` for inputs ``X`` ``[n, in_dim]`` and parameters ``theta`` ``[n_params]``."""
        act = ACTIVATIONS[self.activation]
        h, i = X, 0
        last = len(self.layer_dims) - 1
        for k, (fan_in, fan_out) in enumerate(self.layer_dims):
            W = theta[i:i + fan_in * fan_out].reshape(fan_in, fan_out)
            i += fan_in * fan_out
            h = h @ W
            if self.bias:
                h = h + theta[i:i + fan_out]
                i += fan_out
            if k < last:
                h = act(h)
        return h


def make_model(model_cfg, in_dim: int, out_dim: int) -> MLP:
    if model_cfg.name != "mlp":
        raise ValueError(f"unknown model.name {model_cfg.name!r}: expected mlp")
    return MLP(in_dim, out_dim, model_cfg.depth, model_cfg.width, model_cfg.activation, model_cfg.bias)


def loss_value(model: MLP, theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, loss: str,
               weight_decay: float = 0.0) -> torch.Tensor:
    """Mean training loss over the rows of ``X`` (a scalar): ½‖f(x) − y‖² averaged, or cross-entropy,
    plus ``weight_decay``/2 · ‖θ‖² when ``weight_decay`` > 0."""
    out = model.forward(theta, X)
    if loss == "mse":
        value = 0.5 * ((out - Y) ** 2).sum(dim=1).mean()
    elif loss == "cross_entropy":
        value = F.cross_entropy(out, Y)
    else:
        raise ValueError(f"unknown loss {loss!r}: expected mse or cross_entropy")
    if weight_decay:
        value = value + 0.5 * weight_decay * (theta * theta).sum()
    return value
