"""The outcome of a critical-point finder (:class:`RefineResult`), and the bookkeeping every finder shares:
the float64 start, ‖v‖² and the per-iteration history. The finders themselves are in :mod:`pipeline.landscape.refine`
and :mod:`pipeline.landscape.newton_eig`; rows of the ``points`` table are made from the result by
:func:`pipeline.orchestration.rows.refine_columns`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

STOP_REASONS = ("converged", "max_iters", "line_search_failed", "stalled", "gradient_flat")


@dataclass
class RefineResult:
    """Outcome of a critical-point finder started at ``theta0``.

    ``theta`` ``[N]`` float64 (on ``theta0``'s device); ``grad_norm2`` = ‖∇L(θ)‖²; ``distance`` = ‖θ − θ0‖;
    ``stopped_because`` ∈ ``STOP_REASONS``. ``relative_residual`` / ``cokernel_residual``: Frye et al.'s
    gradient-flat test quantities from MINRES on ``H p = −g`` at the final point (NaN when converged).
    ``history``: one entry per iteration (lists of equal length; iteration 0 is the start).
    """

    method: str
    theta: torch.Tensor
    loss: float
    loss0: float
    grad_norm2: float
    grad_norm2_0: float
    iterations: int
    stopped_because: str
    distance: float
    relative_residual: float
    cokernel_residual: float
    hvps: int
    grads: int
    seconds: float
    history: dict = field(default_factory=dict)

    @property
    def loss_change(self) -> float:
        """``L(θ) − L(θ0)``: negative when refinement lowered the loss."""
        return self.loss - self.loss0

    @property
    def converged(self) -> bool:
        return self.stopped_because == "converged"


def flat_start(theta0: torch.Tensor) -> torch.Tensor:
    """A finder's start: a float64 copy of ``theta0`` ``[N]``; a ValueError for another shape or a NaN/inf."""
    if theta0.dim() != 1:
        raise ValueError(f"theta0 must be a flat [N] parameter vector, got shape {tuple(theta0.shape)}")
    theta = theta0.detach().to(torch.float64).clone()
    if not torch.isfinite(theta).all():
        raise ValueError("theta0 contains NaN or inf")
    return theta


def norm2(v: torch.Tensor) -> float:
    """‖v‖² of a flat ``[N]`` vector, as a float."""
    return float(v @ v)


def new_history(**cols) -> dict:
    """A finder's history (:attr:`RefineResult.history`) whose iteration 0 holds ``cols``."""
    return {k: [v] for k, v in cols.items()}


def push_history(history: dict, **cols) -> None:
    """Append one iteration's ``cols`` to ``history``."""
    for k, v in cols.items():
        history[k].append(v)
