"""The dense Hessian of a loss of flat parameters, ``[N, N]`` (or ``[B, N, N]`` for B points).

For an MLP's mean loss the Hessian comes in closed form, block by block (``closed_form``,
:mod:`pipeline.curvature.mlp_hessian`, offered by the loss as ``loss_fn.closed_form``), the default wherever the loss
offers it. Otherwise it is built a block of rows at a time from Hessian-vector products with basis vectors
(:func:`pipeline.curvature.hvp.hvp_rows`), vmapped over the block, so the build is a few large batched kernels rather
than N autograd calls; ``rev`` and ``fwd`` (:mod:`pipeline.curvature.hvp`) give the same rows. The build's workspace
is one block (:func:`pipeline.curvature.hessian_memory.default_chunk_size`) — never an N×N identity.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch.func import vmap

from pipeline.curvature import hvp as hvps
from pipeline.curvature.hessian_memory import default_chunk_size, default_workspace_bytes
from pipeline.curvature.hvp import LossFn, WeightedTerms
from pipeline.numerics.symmetric import symmetrize_

HVP_MODES = ("auto", *hvps.MODES, "closed_form")
DEFAULT_HVP = {"cpu": "rev", "cuda": "rev"}


def resolve_hvp(hvp: str, device: torch.device, loss_fn: Union[LossFn, WeightedTerms, None] = None) -> str:
    """How H is built: ``auto`` → ``closed_form`` when every term of ``loss_fn`` offers one, else the
    device's HVP mode (``rev``). Asking for ``closed_form`` where a term has none is a ValueError."""
    if hvp not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {hvp!r}: expected one of {', '.join(HVP_MODES)}")
    offered = loss_fn is not None and all(_closed_form(f) is not None for _, f in hvps.terms(loss_fn))
    if hvp == "closed_form" and not offered:
        raise ValueError("hvp='closed_form' needs a loss that offers one (an MLP's MeanLoss); "
                         "use 'rev' or 'fwd' for other models")
    if hvp == "auto":
        return "closed_form" if offered else DEFAULT_HVP.get(device.type, "rev")
    return hvp


def _closed_form(fn) -> Optional[Callable[..., torch.Tensor]]:
    """A loss term's closed-form Hessian builder (:attr:`pipeline.curvature.problem.MeanLoss.closed_form`), or None."""
    return getattr(fn, "closed_form", None)


def activation_bytes(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor) -> int:
    """Bytes autograd saves for the backward pass of the largest term of ``loss_fn`` at ``theta``
    (one forward pass, measured with saved-tensor hooks): the memory one HVP column holds, up to a
    small factor."""
    most = 0
    for _, fn in hvps.terms(loss_fn):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(theta.detach().requires_grad_(True))
        most = max(most, total)
    return most


def column_bytes(loss_fn, theta: torch.Tensor) -> int:
    # Three saved-activation sets per column (forward, backward, their tangents) and 8 N-vectors
    # (basis row, output row, gradient slices): enough to bound CUDA peaks (docs/performance.md).
    return 3 * activation_bytes(loss_fn, theta) + 8 * theta.numel() * theta.element_size()


def _fill(H: torch.Tensor, rows_for: Callable[[torch.Tensor], torch.Tensor], weight: float, first: bool,
          chunk: int) -> None:
    """H[..., s:s+c, :] (+)= weight · rows_for(E) for basis blocks E = I[s:s+c], one reused buffer."""
    n = H.shape[-1]
    E = torch.zeros(min(chunk, n), n, dtype=H.dtype, device=H.device)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        idx = torch.arange(rows, device=H.device)
        E[idx, idx + start] = 1
        block = rows_for(E[:rows])
        target = H[..., start:start + rows, :]
        if first:
            target.copy_(block)
            if weight != 1.0:
                target.mul_(weight)
        else:
            target.add_(block, alpha=weight)
        E[idx, idx + start] = 0


def hessian(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, *, chunk_size: int = 0,
            memory_budget_mb: float = 0.0, hvp: str = "auto", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense, symmetrised Hessian ``[N, N]`` of ``loss_fn`` at ``theta`` ``[N]``.

    Built on ``theta``'s device and dtype. ``loss_fn`` may be a list of ``(weight, fn)`` pairs whose
    weighted sum is the loss (e.g. per-batch losses weighted by batch size / n): their Hessians are
    accumulated, so data that does not fit one batch never has to be in memory at once.
    ``chunk_size``: columns per vmapped call (0: as many as ``memory_budget_mb`` MiB of build
    workspace hold — the Hessian itself comes on top — or the device default, see
    :func:`default_chunk_size`). ``hvp``: ``auto``, ``closed_form``, ``rev`` or ``fwd`` (see
    :func:`resolve_hvp`). ``out``: an
    ``[N, N]`` tensor to build into (e.g. a slice of a batch), else a new one. ``hvp='closed_form'``
    (what ``auto`` picks when every term offers it) ignores ``chunk_size``; its temporaries stay within
    the same workspace.
    """
    mode = resolve_hvp(hvp, theta.device, loss_fn)
    if theta.dim() != 1 and not (mode == "closed_form" and theta.dim() == 2):
        raise ValueError(f"theta must be a flat 1-D parameter vector, got shape {tuple(theta.shape)}")
    theta = theta.detach()
    n = theta.shape[-1]
    H = theta.new_empty(*theta.shape[:-1], n, n) if out is None else out
    if H.shape != (*theta.shape[:-1], n, n):
        raise ValueError(f"out must be {[*theta.shape[:-1], n, n]}, got {tuple(H.shape)}")
    if mode == "closed_form":  # also takes B points [B, N] at once (see hessians)
        workspace = memory_budget_mb * 2**20 or default_workspace_bytes(theta.device)
        for i, (weight, fn) in enumerate(hvps.terms(loss_fn)):
            _closed_form(fn)(theta, out=H, weight=weight, accumulate=i > 0, workspace_bytes=workspace)
        return H
    chunk = chunk_size or default_chunk_size(n, theta.device, column_bytes=column_bytes(loss_fn, theta),
                                             workspace_bytes=memory_budget_mb * 2**20)
    for i, (weight, fn) in enumerate(hvps.terms(loss_fn)):
        _fill(H, hvps.hvp_rows(fn, theta, mode), weight, i == 0, chunk)
    symmetrize_(H)
    return H


def hessians(loss_fn: Union[LossFn, WeightedTerms], thetas: torch.Tensor, *, chunk_size: int = 0,
             memory_budget_mb: float = 0.0, hvp: str = "auto") -> torch.Tensor:
    """Hessians ``[B, N, N]`` of one loss at many points ``thetas`` ``[B, N]`` (same architecture), built
    in one vmapped pass over the points: ``loss_fn`` must be vmappable in its parameter argument.
    ``chunk_size`` counts columns per point; the default divides the workspace among the B points.
    A closed-form build (see :func:`hessian`) takes the B points in batched GEMMs instead."""
    if thetas.dim() != 2:
        raise ValueError(f"thetas must be [B, N], got shape {tuple(thetas.shape)}")
    thetas = thetas.detach()
    b, n = thetas.shape
    mode = resolve_hvp(hvp, thetas.device, loss_fn)
    if mode == "closed_form":
        return hessian(loss_fn, thetas, memory_budget_mb=memory_budget_mb, hvp=mode)
    chunk = chunk_size or default_chunk_size(n, thetas.device, column_bytes=column_bytes(loss_fn, thetas[0]),
                                             workspace_bytes=memory_budget_mb * 2**20, n_points=b)
    H = torch.empty(b, n, n, dtype=thetas.dtype, device=thetas.device)
    for i, (weight, fn) in enumerate(hvps.terms(loss_fn)):
        over_points = vmap(lambda th, V, fn=fn: hvps.hvp_rows(fn, th, mode)(V), in_dims=(0, None))
        _fill(H, lambda V: over_points(thetas, V), weight, i == 0, chunk)
    symmetrize_(H)
    return H
