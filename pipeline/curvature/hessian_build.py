"""The dense Hessian of a loss of flat parameters, ``[N, N]`` (or ``[B, N, N]`` for B points).

For an MLP's mean loss the Hessian comes in closed form, block by block (``closed_form``,
:mod:`pipeline.curvature.mlp_hessian`, offered by the loss as ``loss_fn.closed_form``), the default wherever the loss
offers it. Otherwise it is built a block of rows at a time from Hessian-vector products with basis vectors,
vmapped over the block, so the build is a few large batched kernels rather than N autograd calls; ``rev`` and
``fwd`` (:mod:`pipeline.curvature.hvp`) give the same rows. A loss that offers θ split by parameter tensor
(a module's, :func:`pipeline.curvature.hvp.split_of`) is built tensor by tensor, each tensor's columns only
over itself and the tensors after it (:func:`pipeline.curvature.hvp.hvp_part_rows`), the rest filled by
symmetry; any other loss row block by row block over all of θ (:func:`pipeline.curvature.hvp.hvp_rows`).
``hvp='auto'`` without a closed form times one block of each mode on the loss and device at hand and keeps
the faster, cached per device and loss structure for the process (:func:`resolve_hvp`). The build's
workspace is one block (:func:`pipeline.curvature.hessian_memory.default_chunk_size`) — never an N×N identity.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Union

import torch
from torch.func import vmap

from pipeline.curvature import hvp as hvps
from pipeline.curvature.hessian_memory import default_chunk_size, default_workspace_bytes
from pipeline.curvature.hvp import LossFn, WeightedTerms
from pipeline.numerics.symmetric import symmetrize_

HVP_MODES = ("auto", *hvps.MODES, "closed_form")
DEFAULT_HVP = {"cpu": "rev", "cuda": "rev"}  # auto's pick where no probe runs (no point given, or a small build)
PROBE_MIN_BLOCKS = 16  # auto probes only builds of at least this many blocks: then the probe is a small share
# auto's picks in this process: (device, dtype, loss structure) -> (mode, {mode: seconds of one block}).
AUTO_PICKS: dict = {}


def resolve_hvp(hvp: str, device: torch.device, loss_fn: Union[LossFn, WeightedTerms, None] = None,
                theta: Optional[torch.Tensor] = None, chunk: int = 0) -> str:
    """How H is built: ``auto`` → ``closed_form`` when every term of ``loss_fn`` offers one; else, given
    the point ``theta`` ``[N]`` and the build's ``chunk`` (columns per block) of a build of at least
    :data:`PROBE_MIN_BLOCKS` blocks, the faster of ``rev`` and ``fwd`` on one block (:func:`probe_hvp`,
    cached per device and loss structure); else the device's :data:`DEFAULT_HVP`. Asking for
    ``closed_form`` where a term has none is a ValueError."""
    if hvp not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {hvp!r}: expected one of {', '.join(HVP_MODES)}")
    offered = loss_fn is not None and all(_closed_form(f) is not None for _, f in hvps.terms(loss_fn))
    if hvp == "closed_form" and not offered:
        raise ValueError("hvp='closed_form' needs a loss that offers one (an MLP's MeanLoss); "
                         "use 'rev' or 'fwd' for other models")
    if hvp != "auto":
        return hvp
    if offered:
        return "closed_form"
    if theta is None or chunk <= 0 or theta.shape[-1] < PROBE_MIN_BLOCKS * chunk:
        return DEFAULT_HVP.get(device.type, "rev")
    return probe_hvp(loss_fn, theta[0] if theta.dim() == 2 else theta, chunk)[0]


def structure(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor) -> tuple:
    """What decides which HVP mode is faster, as a cache key: device, dtype, N, and per term its type, its
    model's type (and import path), its split and its data's shape."""
    def term_key(fn) -> tuple:
        model = getattr(fn, "model", None)
        X = getattr(fn, "X", None)
        return (type(fn).__qualname__, type(model).__qualname__, getattr(model, "target", None),
                tuple(getattr(fn, "part_sizes", None) or ()), None if X is None else tuple(X.shape))
    return (str(theta.device), theta.dtype, theta.shape[-1], tuple(term_key(f) for _, f in hvps.terms(loss_fn)))


def probe_hvp(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, chunk: int) -> tuple[str, dict]:
    """``(mode, {mode: seconds})``: each mode of :data:`pipeline.curvature.hvp.MODES` timed building one
    block of ``chunk`` columns of the first term at ``theta`` ``[N]`` (:func:`_probe_block`; once each, on
    the device, synchronised; the caller's loss and gradient evaluations have paid the one-off
    initialisations), the faster one picked. Cached in :data:`AUTO_PICKS` per :func:`structure`."""
    key = structure(loss_fn, theta)
    if key not in AUTO_PICKS:
        fn, theta = hvps.terms(loss_fn)[0][1], theta.detach()
        seconds = {}
        for mode in hvps.MODES:
            _sync(theta.device)
            t0 = time.perf_counter()
            _probe_block(fn, theta, mode, chunk)
            _sync(theta.device)
            seconds[mode] = time.perf_counter() - t0
        AUTO_PICKS[key] = (min(seconds, key=seconds.get), seconds)
    return AUTO_PICKS[key]


def _probe_block(fn, theta: torch.Tensor, mode: str, chunk: int) -> torch.Tensor:
    """The rows of one block of at most ``chunk`` columns of ``fn`` at ``theta``, in ``mode``: of the largest
    parameter tensor where ``fn`` offers a split (the tensor most of the build's columns belong to), else
    the build's first block."""
    split = hvps.split_of(fn)
    part = max(range(len(split[0])), key=split[0].__getitem__) if split else 0
    size = split[0][part] if split else theta.numel()
    E = torch.eye(min(chunk, size), size, dtype=theta.dtype, device=theta.device)
    return (hvps.hvp_part_rows(fn, theta, mode, part) if split else hvps.hvp_rows(fn, theta, mode))(E)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _put(H[..., start:start + rows, :], rows_for(E[:rows]), weight, first)
        E[idx, idx + start] = 0


def _put(target: torch.Tensor, values: torch.Tensor, weight: float, first: bool) -> None:
    """``target`` = weight · ``values`` for the first term, += for the later ones."""
    if first:
        target.copy_(values)
        if weight != 1.0:
            target.mul_(weight)
    else:
        target.add_(values, alpha=weight)


def _fill_parts(H: torch.Tensor, rows_of: Callable[[int], Callable[[torch.Tensor], torch.Tensor]], sizes: list[int],
                weight: float, first: bool, chunk: int) -> None:
    """H (+)= weight · the Hessian of one term split in parts of ``sizes``: for each part l at offset s,
    ``rows_of(l)`` maps basis blocks E ``[c, k_l]`` to rows ``[..., c, N - s]``, written to
    H[..., s+i:s+i+c, s:] and mirrored into H[..., s+k_l:, s+i:s+i+c]; nothing below a part's rows is built."""
    s = 0
    for part, k in enumerate(sizes):
        rows_for = rows_of(part)
        for i in range(0, k, chunk):
            c = min(chunk, k - i)
            block = rows_for(_basis(c, k, i, H))
            _put(H[..., s + i:s + i + c, s:], block, weight, first)
            _put(H[..., s + k:, s + i:s + i + c], block[..., k:].transpose(-1, -2), weight, first)
        s += k


def _basis(c: int, k: int, start: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start..start+c`` of the k×k identity, ``[c, k]``, in ``like``'s dtype and device."""
    E = torch.zeros(c, k, dtype=like.dtype, device=like.device)
    E[torch.arange(c), torch.arange(start, start + c)] = 1
    return E


def _fill_term(H: torch.Tensor, fn, theta: torch.Tensor, mode: str, weight: float, first: bool, chunk: int) -> None:
    """H (+)= weight · the Hessian of one term ``fn`` at ``theta`` ``[N]`` (``H`` ``[N, N]``) or at each of
    the points ``theta`` ``[B, N]`` (``H`` ``[B, N, N]``, vmapped over the points): by parameter tensor
    where the term offers a split, else by row blocks over all of θ."""
    split = hvps.split_of(fn)
    if theta.dim() == 1:
        if split:
            _fill_parts(H, lambda l: hvps.hvp_part_rows(fn, theta, mode, l), split[0], weight, first, chunk)
        else:
            _fill(H, hvps.hvp_rows(fn, theta, mode), weight, first, chunk)
        return
    if split:
        def rows_of(l):
            over_points = vmap(lambda th, V: hvps.hvp_part_rows(fn, th, mode, l)(V), in_dims=(0, None))
            return lambda V: over_points(theta, V)
        _fill_parts(H, rows_of, split[0], weight, first, chunk)
    else:
        over_points = vmap(lambda th, V: hvps.hvp_rows(fn, th, mode)(V), in_dims=(0, None))
        _fill(H, lambda V: over_points(theta, V), weight, first, chunk)


def build_mode(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, *, chunk_size: int = 0,
               memory_budget_mb: float = 0.0, hvp: str = "auto") -> tuple[str, int]:
    """(mode, chunk): the mode :func:`hessian` (``theta`` ``[N]``) or :func:`hessians` (``[B, N]``) builds in
    with these arguments — ``closed_form``, ``rev`` or ``fwd``, ``auto`` resolved, probing once if it must —
    and, for an HVP build, its columns per block per point (``chunk_size``, or measured from the workspace:
    one forward pass with saved-tensor hooks). Passed on as ``chunk_size``, the chunk spares the build that
    pass; a closed-form build needs none (0)."""
    mode = resolve_hvp(hvp, theta.device, loss_fn)
    if mode == "closed_form":
        return mode, chunk_size
    chunk = _chunk(loss_fn, theta, chunk_size, memory_budget_mb)
    if hvp == "auto":  # a large enough build probes rev against fwd with this chunk
        mode = resolve_hvp(hvp, theta.device, loss_fn, theta, chunk)
    return mode, chunk


def _chunk(loss_fn, theta: torch.Tensor, chunk_size: int, memory_budget_mb: float) -> int:
    """Columns per block per point: ``chunk_size``, or what the workspace holds (``theta`` ``[N]`` or ``[B, N]``)."""
    first = theta if theta.dim() == 1 else theta[0]
    return chunk_size or default_chunk_size(theta.shape[-1], theta.device, column_bytes=column_bytes(loss_fn, first),
                                            workspace_bytes=memory_budget_mb * 2**20,
                                            n_points=1 if theta.dim() == 1 else theta.shape[0])


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
    chunk = _chunk(loss_fn, theta, chunk_size, memory_budget_mb)
    mode = resolve_hvp(hvp, theta.device, loss_fn, theta, chunk)
    for i, (weight, fn) in enumerate(hvps.terms(loss_fn)):
        _fill_term(H, fn, theta, mode, weight, i == 0, chunk)
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
    chunk = _chunk(loss_fn, thetas, chunk_size, memory_budget_mb)
    mode = resolve_hvp(hvp, thetas.device, loss_fn, thetas, chunk)
    H = torch.empty(b, n, n, dtype=thetas.dtype, device=thetas.device)
    for i, (weight, fn) in enumerate(hvps.terms(loss_fn)):
        _fill_term(H, fn, thetas, mode, weight, i == 0, chunk)
    symmetrize_(H)
    return H
