"""The problem a run poses: its model, data set and loss, and the loss as a function of a flat ``theta``.

Rebuilt identically from a run's config and seed wherever it is needed (training, the Hessian job, the
HVP shards), so nothing but the config and the seed travels between processes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pipeline.curvature.data import Dataset, batches, make_dataset
from pipeline.curvature.mlp_hessian import mlp_hessian
from pipeline.curvature.models import MLP, Model, loss_value, make_model, output_loss

DTYPES = {"float32": torch.float32, "float64": torch.float64}  # optim.dtype, hessian.dtype


@dataclass(frozen=True, eq=False)
class MeanLoss:
    """The mean loss of ``model`` over the rows of ``X``, ``Y`` as a function of a flat ``theta`` ``[N]``
    (:func:`pipeline.curvature.models.loss_value`; works under ``torch.func`` transforms). For an MLP it also
    offers its exact Hessian in closed form (:attr:`closed_form`), which :func:`pipeline.curvature.hessian.hessian`
    uses instead of N Hessian-vector products."""

    model: Model
    X: torch.Tensor
    Y: torch.Tensor
    loss: str
    weight_decay: float = 0.0

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return loss_value(self.model, theta, self.X, self.Y, self.loss, self.weight_decay)

    @property
    def part_sizes(self) -> Optional[list[int]]:
        """Sizes of θ's parts, one per parameter tensor, when the model evaluates from them
        (``forward_parts``, e.g. :class:`pipeline.curvature.torch_model.TorchModel`); else None. The
        Hessian build uses the split to skip the block below the diagonal (:mod:`pipeline.curvature.hvp`)."""
        if not hasattr(self.model, "forward_parts"):
            return None
        return [size for _, _, size in self.model.segments()]

    def of_parts(self, parts) -> torch.Tensor:
        """The loss at θ given as its parts ``[θ_0 [k_0], …]`` (see :attr:`part_sizes`): ``self(cat(parts))``."""
        value = output_loss(self.model.forward_parts(parts, self.X), self.Y, self.loss)
        if self.weight_decay:
            value = value + 0.5 * self.weight_decay * sum((p * p).sum() for p in parts)
        return value

    @property
    def closed_form(self) -> Optional[Callable[..., torch.Tensor]]:
        """``f(theta, out=, weight=, accumulate=, workspace_bytes=)`` writing weight · H into ``out``
        (:func:`pipeline.curvature.mlp_hessian.mlp_hessian`), or None for models without one (CNN)."""
        if not isinstance(self.model, MLP):
            return None
        return functools.partial(mlp_hessian, self.model, X=self.X, Y=self.Y, loss=self.loss,
                                 weight_decay=self.weight_decay)


@dataclass(frozen=True)
class Problem:
    """Everything needed to evaluate a run's training loss: rebuilt identically from config + seed."""

    model: Model  # MLP or CNN
    data: Dataset
    loss: str
    weight_decay: float

    def loss_fn(self, X: Optional[torch.Tensor] = None, Y: Optional[torch.Tensor] = None,
                weight_decay: Optional[float] = None) -> MeanLoss:
        X = self.data.X if X is None else X
        Y = self.data.Y if Y is None else Y
        wd = self.weight_decay if weight_decay is None else weight_decay
        return MeanLoss(self.model, X, Y, self.loss, wd)

    def batched_loss_terms(self, batch_size: int) -> list:
        """The full-batch loss as ``(n_b / n, loss on batch b)`` terms; L2 counted once, in the first."""
        n = self.data.n
        return [((s.stop - s.start) / n,
                 self.loss_fn(self.data.X[s], self.data.Y[s], self.weight_decay * n / (s.stop - s.start)
                              if i == 0 else 0.0))
                for i, s in enumerate(batches(n, batch_size))]

    def to(self, device, dtype) -> "Problem":
        return Problem(self.model, self.data.to(device, dtype), self.loss, self.weight_decay)


def make_problem(data_cfg, model_cfg, seed: int, weight_decay: float = 0.0) -> Problem:
    """The model, data set and loss of a run: ``data_cfg`` and ``model_cfg`` are its ``data`` and ``model``
    settings (records with the keys of the config's sections, read as attributes), ``weight_decay`` its
    L2 coefficient λ (the loss adds λ/2·‖θ‖²)."""
    data = make_dataset(data_cfg, seed, model_cfg.loss)
    model = make_model(model_cfg, data.in_dim, data.out_dim, data.sample_shape, seed)
    return Problem(model, data, model_cfg.loss, float(weight_decay))
