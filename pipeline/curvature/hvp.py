"""Hessian-vector products of a loss of flat parameters: the one implementation every stage uses.

A loss is a function ``loss_fn(theta [N]) -> scalar`` (:data:`LossFn`), or a weighted sum of such terms
``[(w, fn), ...]`` (:data:`WeightedTerms`, e.g. per-data-batch losses weighted n_b/n, so the data never has
to be in memory at once). :func:`terms` reads either form as a list of terms.

Two differentiation modes give the same product ``H v``:

- ``rev`` (reverse-over-reverse, ``vjp`` of ``grad``): the forward and first backward pass are taken once
  per operator, and only the second backward is repeated (vmapped) over the vectors;
- ``fwd`` (forward-over-reverse, ``jvp`` of ``grad``): one forward-mode pass through the gradient per vector.

:func:`hvp_fn` is the product for one term; :func:`hvp_rows` vmaps it over basis rows (the dense Hessian
build, :mod:`pipeline.curvature.hessian`), :func:`hvp_matvec` over column blocks (the estimator's operator,
:mod:`pipeline.curvature.estimate`) and :func:`hvp_at` applies it to one vector (power iteration, refinement).
A term may also offer θ split by parameter tensor (:func:`split_of`: ``part_sizes`` and ``of_parts``, as
:class:`pipeline.curvature.problem.MeanLoss` does for a module's parameters). Then :func:`hvp_part_rows`
gives the Hessian's rows for one tensor's basis vectors over that tensor and the ones after it only: the
tensors before it are constants (no tangent, no gradient), so autograd prunes their forward tangents and
backward work, and the missing block is the mirror of one already built (H is symmetric).
Everything runs on ``theta``'s device and dtype and knows nothing of models, Ray or files.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch.func import grad, jvp, vjp, vmap

from pipeline.numerics.lanczos import MatVec

LossFn = Callable[[torch.Tensor], torch.Tensor]  # theta [N] -> scalar
WeightedTerms = Sequence[tuple[float, LossFn]]  # the loss as Σ w · fn(theta)
MODES = ("rev", "fwd")


def terms(loss_fn: Union[LossFn, WeightedTerms]) -> list[tuple[float, LossFn]]:
    """``loss_fn`` as ``(weight, fn)`` terms: a plain function is one term of weight 1."""
    return [(1.0, loss_fn)] if callable(loss_fn) else [(float(w), f) for w, f in loss_fn]


def check_mode(mode: str) -> None:
    """ValueError naming ``mode`` unless it is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"unknown HVP mode {mode!r}: expected one of {', '.join(MODES)}")


def hvp_fn(fn: LossFn, theta: torch.Tensor, mode: str) -> MatVec:
    """``v ↦ H(θ) v`` ``[N] → [N]`` for one term ``fn`` at ``theta`` ``[N]``, vmappable over ``v``.

    ``rev`` takes the forward and first backward pass here, once, and keeps what they saved while the
    returned function lives; ``fwd`` keeps nothing and differentiates ``grad(fn)`` forward per call."""
    check_mode(mode)
    if mode == "rev":
        _, pull = vjp(grad(fn), theta)  # forward + backward once; only the second backward is repeated
        return lambda v: pull(v)[0]
    g = grad(fn)
    return lambda v: jvp(g, (theta,), (v,))[1]


def hvp_rows(fn: LossFn, theta: torch.Tensor, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Basis rows ``V`` ``[c, N]`` ↦ ``V H`` ``[c, N]`` (rows of the Hessian of one term ``fn``)."""
    return vmap(hvp_fn(fn, theta, mode))


def split_of(fn) -> Optional[tuple[list[int], Callable[[Sequence[torch.Tensor]], torch.Tensor]]]:
    """A term's θ split by parameter tensor: ``(sizes, of_parts)`` where θ is ``sizes`` flat parts end to
    end and ``of_parts([θ_0, …, θ_L])`` is ``fn(θ)``; None when the term offers no split (``part_sizes``
    None or absent, or one part only)."""
    sizes = getattr(fn, "part_sizes", None)
    if sizes is None or len(sizes) < 2:
        return None
    return list(sizes), fn.of_parts


def hvp_part_rows(fn, theta: torch.Tensor, mode: str, part: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Basis rows ``V`` ``[c, k]`` of parameter tensor ``part`` (k entries at offset s in θ) ↦ the Hessian
    rows ``(V H)[:, s:]`` ``[c, N - s]``: the block of ``part`` against itself and every later tensor.

    ``fn`` must offer a split (:func:`split_of`). ``rev`` differentiates the gradient of tensor ``part``
    backward w.r.t. tensors ``part..L``; ``fwd`` pushes the tangent of tensor ``part`` forward through the
    gradient w.r.t. tensors ``part..L``. Vmappable over the rows and over ``theta`` ``[N]``."""
    check_mode(mode)
    sizes, of_parts = split_of(fn)
    parts = list(torch.split(theta, sizes, dim=-1))
    fixed, rest = parts[:part], parts[part:]

    def loss(*ps):
        return of_parts([*fixed, *ps])

    if mode == "rev":
        _, pull = vjp(grad(loss), *rest)  # d/dθ_part, a function of θ_part..θ_L
        return vmap(lambda v: torch.cat(pull(v), dim=-1))
    every = tuple(range(len(rest)))

    def g(head):
        return torch.cat(grad(loss, argnums=every)(head, *rest[1:]), dim=-1)

    return vmap(lambda v: jvp(g, (rest[0],), (v,))[1])


def hvp_at(loss_fn: LossFn, theta: torch.Tensor, mode: str = "fwd") -> MatVec:
    """``v ↦ H(θ) v`` ``[N] → [N]`` for one vector at a time (one HVP ≈ 2–3 gradients). ``fwd`` by
    default: it holds no saved activations between calls."""
    return hvp_fn(loss_fn, theta.detach(), mode)


def hvp_matvec(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, *,
               chunk_size: int = 0, mode: str = "rev") -> MatVec:
    """The Hessian of ``loss_fn`` at ``theta`` ``[N]`` as a batched operator ``V [N, k] -> H V [N, k]``.

    Each call takes each term's product over the k columns in vmapped calls of at most ``chunk_size``
    columns (0: all k; memory grows with it) and accumulates the weighted terms, one term's saved
    activations at a time (``rev`` repeats its forward and first backward pass per call and chunk)."""
    if theta.dim() != 1:
        raise ValueError(f"theta must be a flat 1-D parameter vector, got shape {tuple(theta.shape)}")
    check_mode(mode)
    theta = theta.detach()
    parts = terms(loss_fn)

    def matvec(V: torch.Tensor) -> torch.Tensor:
        if V.dim() != 2 or V.shape[0] != theta.numel():
            raise ValueError(f"matvec expects [N={theta.numel()}, k], got shape {tuple(V.shape)}")
        step = chunk_size if chunk_size > 0 else V.shape[1]
        out = torch.zeros_like(V)
        for s in range(0, V.shape[1], step):
            for w, f in parts:
                out[:, s:s + step] += w * vmap(hvp_fn(f, theta, mode), in_dims=1, out_dims=1)(V[:, s:s + step])
        return out

    return matvec
