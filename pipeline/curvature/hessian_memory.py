"""Memory and method planning for the Hessian stage: which counting method fits, how many points one pass
holds, and how much build workspace a block of columns may take.

Peak memory of counting one point, in units of its Hessian (N² numbers), is :data:`FOOTPRINT`; the stage's
budget (:func:`total_budget_bytes`) gives :data:`HESSIAN_SHARE` of it to the pass's Hessians and their
counting, the rest to the build's workspace (:func:`pass_workspace_mb`).
"""
from __future__ import annotations

import os
from typing import Union

import torch

from pipeline.curvature import inertia

# `auto` takes the full spectrum up to this many parameters, counts only (LDLᵀ) above: about where the
# spectrum stops costing no more than the counts (docs/performance.md).
AUTO_EIGH_MAX_N = {"cpu": 4096, "cuda": 4096}
METHODS = ("auto", "eigh", "inertia", "estimate")
MATRIX_FREE = ("estimate",)  # methods that never hold the dense Hessian (no gap rule: tol_mode=gap)
# Build workspace on CPU: 16 MiB × threads², at most 256 MiB. On one thread, blocks whose activations stay
# in cache are fastest; more threads want bigger blocks to amortise each op's fork/join (docs/performance.md).
CPU_WORKSPACE_BYTES = 16 * 2**20
CPU_WORKSPACE_MAX_BYTES = 256 * 2**20
# Build several points in one vmapped pass only where it pays: on CUDA it turns B small launches into
# one; on CPU the build is compute-bound and gains nothing (docs/performance.md).
BATCH_POINTS_DEVICES = ("cuda",)
# What counting holds, in units of one Hessian (N² numbers), as (per point of a pass, once per pass):
# inertia: H, and one point's saved lower triangle. eigh: H and the copy eigh takes (one batched call);
# with eigenvectors (vectors=True, one point at a time), H, and one point's eigenvectors and workspace —
# LAPACK dsyevd's 2N² + 6N + 1 numbers on CPU, cuSOLVER syevd's 4.0×H on CUDA (docs/performance.md). These
# plan the fast path; a CUDA pass of one point whose eigvalsh does not fit takes its eigenvalues in about
# 1.1×H instead (cusolver.eigvalsh_inplace_, slower; see pipeline.curvature.hessian._eigen).
FOOTPRINT = {("inertia", "cpu"): (1.0, inertia.SAVED_SHARE), ("inertia", "cuda"): (1.0, inertia.SAVED_SHARE),
             ("eigh", "cpu"): (2.0, 0.0), ("eigh", "cuda"): (2.0, 4.0),
             ("eigh_vectors", "cpu"): (1.0, 3.0), ("eigh_vectors", "cuda"): (1.0, 5.0)}
HESSIAN_SHARE = 0.75  # of the stage's memory for Hessians and their counting; the rest is build workspace


def default_chunk_size(n_params: int, device: torch.device, *, column_bytes: int,
                       workspace_bytes: float = 0.0, n_points: int = 1) -> int:
    """Columns per point per vmapped HVP call: ``workspace_bytes`` / ``column_bytes`` shared by
    ``n_points`` points, in [1, N].

    ``column_bytes``: what one column needs while it is built (activations of its HVP and a few
    N-vectors). ``workspace_bytes`` 0 means the device default (:func:`default_workspace_bytes`).
    """
    workspace_bytes = workspace_bytes if workspace_bytes > 0 else default_workspace_bytes(device)
    return int(max(1, min(n_params, workspace_bytes // max(1, column_bytes) // n_points)))


def default_workspace_bytes(device: torch.device) -> float:
    """Build workspace when none is given: a quarter of free memory on CUDA (big blocks keep the GPU
    busy); on CPU 16 MiB × threads², at most 256 MiB (cache-sized blocks on one thread, bigger ones
    to keep several threads busy)."""
    if device.type == "cuda":
        return 0.25 * torch.cuda.mem_get_info(device)[0]
    return float(min(CPU_WORKSPACE_BYTES * torch.get_num_threads() ** 2, CPU_WORKSPACE_MAX_BYTES))


def resolve_method(method: str, n_params: int, device: Union[str, torch.device] = "cpu",
                   itemsize: int = 8, memory_budget_mb: float = 0.0, vectors: bool = False) -> str:
    """``auto`` → ``eigh`` up to :data:`AUTO_EIGH_MAX_N` parameters on that device type, ``inertia`` above
    or where eigh's footprint does not fit, and ``estimate`` (no dense H) where neither does
    (one point's :func:`footprint`: on CPU 2·N²·itemsize bytes for eigh, 4·N²·itemsize with ``vectors``,
    1.53·N²·itemsize for inertia; on CUDA 6·N²·itemsize for eigh — against the :data:`HESSIAN_SHARE` of
    the memory the stage may hold, :func:`total_budget_bytes`, that a pass gives its Hessians — the rest
    is the build's workspace)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        device = torch.device(device)
        limit = AUTO_EIGH_MAX_N.get(device.type, AUTO_EIGH_MAX_N["cpu"])
        room = HESSIAN_SHARE * total_budget_bytes(device, memory_budget_mb)
        for dense in (("eigh", "inertia") if n_params <= limit else ("inertia",)):
            if footprint(dense, device, vectors) * n_params * n_params * itemsize <= room:
                return dense
        return "estimate"
    return method


def _footprint(method: str, device: Union[str, torch.device], vectors: bool) -> tuple[float, float]:
    """:data:`FOOTPRINT` of ``method`` (``eigh`` with ``vectors``: ``eigh_vectors``) on that device type."""
    key = "eigh_vectors" if method == "eigh" and vectors else method
    return FOOTPRINT[(key, "cuda" if torch.device(device).type == "cuda" else "cpu")]


def footprint(method: str, device: Union[str, torch.device] = "cpu", vectors: bool = False) -> float:
    """What counting one point holds, in units of its Hessian (H included)."""
    return sum(_footprint(method, device, vectors))


def total_budget_bytes(device: torch.device, memory_budget_mb: float = 0.0) -> float:
    """The memory the Hessian stage may hold on ``device``: ``memory_budget_mb`` MiB when given, else
    80 % of free CUDA memory, or a quarter of the available RAM on CPU (shared with other workers)."""
    if memory_budget_mb > 0:
        return memory_budget_mb * 2**20
    if device.type == "cuda":
        return 0.8 * torch.cuda.mem_get_info(device)[0]
    try:
        return 0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2 * 2**30


def points_per_pass(n_params: int, itemsize: int, device: torch.device, memory_budget_mb: float = 0.0,
                    method: str = "eigh", vectors: bool = False) -> int:
    """How many Hessians one pass may hold in three quarters of the budget (the last quarter is build
    workspace, :func:`pass_workspace_mb`), each point taking its share of :data:`FOOTPRINT` and the
    pass what is held once (``eigh`` takes the pass's spectra in one batched call, so each point
    needs 2 × its N² numbers; ``inertia`` and eigh with ``vectors`` count one point at a time, so the
    pass needs N² numbers per point and what one point's counting adds)."""
    h = n_params * n_params * itemsize
    room = HESSIAN_SHARE * total_budget_bytes(device, memory_budget_mb)
    per, once = _footprint(method, device, vectors)
    return max(1, int((room - once * h) // (per * h)))


def pass_workspace_mb(device: torch.device, memory_budget_mb: float = 0.0) -> float:
    """Build workspace of a pass, MiB: a quarter of the budget, and no more than the device default."""
    quarter = (1 - HESSIAN_SHARE) * total_budget_bytes(device, memory_budget_mb)
    return min(quarter, default_workspace_bytes(device)) / 2**20
