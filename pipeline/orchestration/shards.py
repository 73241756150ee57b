"""Data-parallel Hessian-vector products over Ray actors — with :mod:`pipeline.orchestration.sweep`, the only Ray code.

For a data set too big for one device (or one process's time), the full-batch Hessian is split by
data: H V = Σ_s (n_s / n) · H_s V, where H_s is the Hessian of the mean loss over shard s (contiguous
rows, the weighting of :meth:`pipeline.curvature.problem.Problem.batched_loss_terms`, L2 counted once). Each actor
rebuilds its own problem from the run's config and seed — no data travels — and keeps only its shard on
its device. A matvec sends θ once per point and V once per call through the object store, and sums
the shards' ``[N, k]`` answers on the caller's device. That is the operator the HVP-only estimator
needs (``hessian.method=estimate`` with ``hessian.data_workers`` > 0); exact methods need H itself.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import ray
import torch

from pipeline.curvature.hvp import hvp_matvec
from pipeline.numerics.lanczos import MatVec
from pipeline.curvature.problem import Problem


@ray.remote
class _Shard:
    """One contiguous slice of a problem's data and the HVPs of its weighted loss term."""

    def __init__(self, problem_for: Callable[[], Problem], shard: int, shards: int, device: str, dtype: str,
                 threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, dtype)
        problem = problem_for().to(self.device, self.dtype)
        terms = problem.batched_loss_terms(math.ceil(problem.data.n / shards))
        self.term = [terms[shard]] if shard < len(terms) else []  # more shards than rows: nothing to add
        self.matvec = None

    def at(self, theta: torch.Tensor) -> int:
        """Move to point ``theta`` ``[N]``; returns how many loss terms (0 or 1) this shard holds."""
        if self.term:
            self.matvec = hvp_matvec(self.term, theta.to(self.device, self.dtype))
        return len(self.term)

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """(n_s / n) · H_s V for ``V`` ``[N, k]``, on the CPU."""
        if not self.term:
            return torch.zeros_like(V)
        return self.matvec(V.to(self.device, self.dtype)).cpu()


@contextlib.contextmanager
def sharded_hvp(problem_for: Callable[[], Problem], shards: int, *, device: str = "cpu",
                dtype: str = "float64", num_cpus: float = 1.0,
                num_gpus: float = 0.0) -> Iterator[Callable[[torch.Tensor], MatVec]]:
    """Start ``shards`` actors (``num_cpus`` / ``num_gpus`` each) for ``problem_for()``'s data; yield
    ``matvec_at(theta) -> (V [N, k] -> H V [N, k])``; stop the actors on exit. Must run inside Ray
    (a driver after ``ray.init`` or a task). ``device="cuda"`` puts each shard on its actor's GPU when it
    has one. The sum is on ``theta``'s device and dtype."""
    if shards < 1:
        raise ValueError(f"shards must be ≥ 1, got {shards}")
    actor = _Shard.options(num_cpus=num_cpus, num_gpus=num_gpus)
    workers = [actor.remote(problem_for, s, shards, device, dtype, int(num_cpus)) for s in range(shards)]
    try:
        def matvec_at(theta: torch.Tensor) -> MatVec:
            theta_ref = ray.put(theta.detach().cpu())
            ray.get([w.at.remote(theta_ref) for w in workers])

            def matvec(V: torch.Tensor) -> torch.Tensor:
                v_ref = ray.put(V.detach().cpu())
                parts = ray.get([w.hvp.remote(v_ref) for w in workers])
                return torch.stack(parts).sum(0).to(V.device, V.dtype)
            return matvec
        yield matvec_at
    finally:
        for w in workers:
            ray.kill(w)
