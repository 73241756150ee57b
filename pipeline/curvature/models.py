"""Stage 4 — models: MLPs and small CNNs written as pure functions of one flat parameter vector.

A flat ``theta`` of shape ``[n_params]`` is what the Hessian is taken with respect to, so the model is a
function ``forward(theta, X) -> [n, out_dim]`` rather than an ``nn.Module``; it works under ``torch.func``
transforms (grad, jvp, vmap over many parameter vectors at once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from pipeline.curvature.torch_model import TorchModel, plain

ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softplus": F.softplus,
    "swish": F.silu,
    "linear": lambda x: x,
}


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}")


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
        _check_activation(self.activation)
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
        return torch.cat(self._init_parts(g)).to(dtype)

    def _init_parts(self, g: torch.Generator) -> list[torch.Tensor]:
        parts = []
        for fan_in, fan_out in self.layer_dims:
            parts.append(_uniform(g, fan_in * fan_out, fan_in))
            if self.bias:
                parts.append(_uniform(g, fan_out, fan_in))
        return parts

    def blocks(self) -> list[tuple[int, int, int]]:
        """The flat layout: ``(start, rows, fan_out)`` of each layer's block of θ, layer by layer — the
        weight ``[fan_in, fan_out]`` then the bias ``[fan_out]``, so one ``[rows, fan_out]`` matrix whose
        last row is the bias (rows = fan_in, + 1 with biases)."""
        out, i = [], 0
        for fan_in, fan_out in self.layer_dims:
            rows = fan_in + (1 if self.bias else 0)
            out.append((i, rows, fan_out))
            i += rows * fan_out
        return out

    def segments(self) -> list[tuple[str, int, int]]:
        """``(name, start, size)`` of each weight and bias in θ: ``layers.<k>.weight``, ``layers.<k>.bias``."""
        out = []
        for k, ((start, _, fan_out), (fan_in, _)) in enumerate(zip(self.blocks(), self.layer_dims)):
            out.append((f"layers.{k}.weight", start, fan_in * fan_out))
            if self.bias:
                out.append((f"layers.{k}.bias", start + fan_in * fan_out, fan_out))
        return out

    def layers(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Views of ``theta`` ``[..., n_params]`` as each layer's weight ``[..., fan_in, fan_out]`` and bias
        ``[..., fan_out]`` (None without biases), as :meth:`blocks` lays them out; leading dimensions are points."""
        out = []
        for (start, rows, fan_out), (fan_in, _) in zip(self.blocks(), self.layer_dims):
            block = theta[..., start:start + rows * fan_out].reshape(*theta.shape[:-1], rows, fan_out)
            out.append((block[..., :fan_in, :], block[..., fan_in, :] if self.bias else None))
        return out

    def forward(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Outputs ``[n, out_dim]`` for inputs ``X`` ``[n, in_dim]`` and parameters ``theta`` ``[n_params]``."""
        act = ACTIVATIONS[self.activation]
        h = X
        layers = self.layers(theta)
        for k, (W, b) in enumerate(layers):
            h = h @ W if b is None else h @ W + b
            if k < len(layers) - 1:
                h = act(h)
        return h


def _uniform(g: torch.Generator, count: int, fan_in: int) -> torch.Tensor:
    """``count`` draws from U(±1/√fan_in), the default of ``nn.Linear`` and ``nn.Conv2d`` (float64)."""
    return (torch.rand(count, generator=g, dtype=torch.float64) * 2 - 1) * (1.0 / math.sqrt(fan_in))


@dataclass(frozen=True)
class CNN:
    """A small CNN for square one-channel images given as flat rows ``[n, side²]``.

    ``conv_layers`` convolutions of ``channels`` channels, ``kernel`` × ``kernel``, stride 1, zero padding
    that keeps the image size (``kernel`` odd), each followed by ``activation``; then the
    ``channels · side²`` features, flattened channel-major as ``nn.Flatten`` does, go through an MLP head
    with ``depth`` hidden layers of ``width`` units (``depth`` = 0: one linear layer) to ``out_dim``.

    ``theta`` holds, layer by layer, each convolution's weight ``[out_c, in_c, k, k]`` (``nn.Conv2d``'s
    layout) and bias ``[out_c]``, then the head's parameters in :class:`MLP`'s layout (weights
    ``[fan_in, fan_out]``, the transpose of ``nn.Linear.weight``).
    """

    in_dim: int
    out_dim: int
    conv_layers: int = 2
    channels: int = 4
    kernel: int = 3
    depth: int = 0
    width: int = 8
    activation: str = "tanh"
    bias: bool = True

    def __post_init__(self):
        _check_activation(self.activation)
        side = math.isqrt(self.in_dim)
        if self.in_dim < 1 or side * side != self.in_dim:
            raise ValueError(f"CNN in_dim must be side² for square images, got {self.in_dim}")
        for name in ("conv_layers", "channels", "kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"CNN {name} must be ≥ 1, got {getattr(self, name)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"CNN kernel must be odd (same padding), got {self.kernel}")

    @property
    def side(self) -> int:
        return math.isqrt(self.in_dim)

    @property
    def conv_dims(self) -> list[tuple[int, int]]:
        """``(in_channels, out_channels)`` of each convolution."""
        chans = [1] + [self.channels] * self.conv_layers
        return list(zip(chans[:-1], chans[1:]))

    @property
    def head(self) -> MLP:
        """The dense layers after the convolutions, as an :class:`MLP` on the flattened feature maps."""
        return MLP(self.channels * self.in_dim, self.out_dim, self.depth, self.width, self.activation, self.bias)

    @property
    def n_conv_params(self) -> int:
        k2 = self.kernel * self.kernel
        return sum(i * o * k2 + (o if self.bias else 0) for i, o in self.conv_dims)

    @property
    def n_params(self) -> int:
        return self.n_conv_params + self.head.n_params

    def segments(self) -> list[tuple[str, int, int]]:
        """``(name, start, size)`` of each piece of θ: ``conv.<k>.weight`` / ``.bias``, then the head's
        ``head.layers.<k>.weight`` / ``.bias``."""
        out, i, k2 = [], 0, self.kernel * self.kernel
        for k, (c_in, c_out) in enumerate(self.conv_dims):
            out.append((f"conv.{k}.weight", i, c_out * c_in * k2))
            i += c_out * c_in * k2
            if self.bias:
                out.append((f"conv.{k}.bias", i, c_out))
                i += c_out
        return out + [(f"head.{n}", i + start, size) for n, start, size in self.head.segments()]

    def init(self, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A flat ``[n_params]`` vector, weights and biases ~ U(±1/√fan_in) as in ``nn.Conv2d`` and
        ``nn.Linear`` (fan_in = in_channels · k² for a convolution); seeded, CPU."""
        g = torch.Generator().manual_seed(int(seed))
        k2, parts = self.kernel * self.kernel, []
        for c_in, c_out in self.conv_dims:
            parts.append(_uniform(g, c_out * c_in * k2, c_in * k2))
            if self.bias:
                parts.append(_uniform(g, c_out, c_in * k2))
        return torch.cat(parts + self.head._init_parts(g)).to(dtype)

    def forward(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Outputs ``[n, out_dim]`` for inputs ``X`` ``[n, side²]`` and parameters ``theta`` ``[n_params]``."""
        act = ACTIVATIONS[self.activation]
        k, s = self.kernel, self.side
        h, i = X.reshape(X.shape[0], 1, s, s), 0
        for c_in, c_out in self.conv_dims:
            W = theta[i:i + c_out * c_in * k * k].reshape(c_out, c_in, k, k)
            i += c_out * c_in * k * k
            b = None
            if self.bias:
                b = theta[i:i + c_out]
                i += c_out
            h = act(F.conv2d(h, W, b, padding=k // 2))
        return self.head.forward(theta[i:], h.reshape(h.shape[0], -1))


Model = Union[MLP, CNN, TorchModel]
MODEL_NAMES = ("mlp", "cnn", "torch")
LOSSES = ("mse", "cross_entropy")  # model.loss: what loss_value computes


def make_model(model_cfg, in_dim: int, out_dim: int, sample_shape: tuple = (), seed: int = 0) -> Model:
    """The network ``model_cfg`` describes (``model.name``: mlp, cnn, or torch: the user's module at the
    import path ``model._target_``, built with ``model.kwargs`` and the run's ``seed``) for ``in_dim``
    inputs (``sample_shape``: one sample's shape, as the user's module receives it)."""
    if model_cfg.name == "torch":
        return TorchModel(str(model_cfg._target_), plain(getattr(model_cfg, "kwargs", None) or {}), tuple(sample_shape),
                          str(getattr(model_cfg, "buffers", "eval")), int(seed))
    if model_cfg.name == "mlp":
        return MLP(in_dim, out_dim, model_cfg.depth, model_cfg.width, model_cfg.activation, model_cfg.bias)
    if model_cfg.name == "cnn":
        return CNN(in_dim, out_dim, model_cfg.conv_layers, model_cfg.channels, model_cfg.kernel,
                   model_cfg.depth, model_cfg.width, model_cfg.activation, model_cfg.bias)
    raise ValueError(f"unknown model.name {model_cfg.name!r}: expected one of {', '.join(MODEL_NAMES)}")


def loss_value(model: Model, theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, loss: str,
               weight_decay: float = 0.0) -> torch.Tensor:
    """Mean training loss over the rows of ``X`` (a scalar): ½‖f(x) − y‖² averaged, or cross-entropy,
    plus ``weight_decay``/2 · ‖θ‖² when ``weight_decay`` > 0."""
    value = output_loss(model.forward(theta, X), Y, loss)
    if weight_decay:
        value = value + 0.5 * weight_decay * (theta * theta).sum()
    return value


def output_loss(out: torch.Tensor, Y: torch.Tensor, loss: str) -> torch.Tensor:
    """The mean ``loss`` (``mse``: ½‖out − y‖² averaged; ``cross_entropy``) of outputs ``out`` ``[n, k]``
    against targets ``Y`` (a scalar), without any weight decay."""
    if loss == "mse":
        return 0.5 * ((out - Y) ** 2).sum(dim=1).mean()
    if loss == "cross_entropy":
        return F.cross_entropy(out, Y)
    raise ValueError(f"unknown loss {loss!r}: expected one of {', '.join(LOSSES)}")
