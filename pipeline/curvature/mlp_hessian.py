"""The exact Hessian of an MLP's mean loss in closed form, block by block, from per-sample layer quantities.

For layers l ≤ m (z_l = a_{l-1} W_l + b_l, a_l = σ(z_l), f = z_L; ã = [a, 1] when there are biases, which
is exactly the flat layout of W_l then b_l), the block of H between layer l's and layer m's parameters is

    H[(j, i), (q, p)] = Σ_n ã_{l-1}[n, j] · K_n[i, q, p],
    K_n[i, q, p] = Hz_n^{lm}[i, p] · ã_{m-1}[n, q] + δ_m[n, p] · ∂ã_{m-1}[n, q]/∂z_l[n, i]   (2nd term: m > l)

with δ_m = ∂ℓ/∂z_m (backpropagation), Hz^{mm} = ∂²ℓ/∂z_m² (its second-order recursion, σ'' terms included)
and Hz^{lm} = (∂z_m/∂z_l)ᵀ Hz^{mm}. The first term is the curvature through the pre-activations, the second
the bilinear coupling of W_m with the activations that W_l moves. Each term of a block is one GEMM over the
samples between small factors (:func:`_add_block`), so the whole build is about 2·n·N² flops (n samples) at
GEMM speed, several times faster than the vmapped HVP build (docs/performance.md). Several points of one model go
together: every quantity carries a leading point dimension, so each GEMM is one batched GEMM over the
points (one launch on a GPU instead of one per point). Checked against ``torch.autograd.functional.hessian``
in tests/test_mlp_hessian.py.

Pure torch; no Ray, Hydra or files. Losses: ``mse`` (½‖f − y‖² averaged over rows) and ``cross_entropy``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.func import jvp

from pipeline.numerics.symmetric import symmetrize_
from pipeline.curvature.models import ACTIVATIONS, MLP

# Workspace for the temporaries when none is given: 64 MiB.
DEFAULT_WORKSPACE_BYTES = 64 * 2**20


def mlp_hessian(model: MLP, theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, loss: str,
                weight_decay: float = 0.0, *, out: Optional[torch.Tensor] = None, weight: float = 1.0,
                accumulate: bool = False, workspace_bytes: float = 0.0) -> torch.Tensor:
    """``weight`` · the Hessian ``[N, N]`` of :func:`pipeline.curvature.models.loss_value` at ``theta`` ``[N]`` over
    ``X`` ``[n, in_dim]``, ``Y`` (``[n, out_dim]`` targets for mse, ``[n]`` class indices for
    cross_entropy), written into ``out`` (or added to it when ``accumulate``: ``out`` must then be
    symmetric, as a sum of Hessians is), else into a new tensor. ``theta`` ``[B, N]`` (B points of the
    model) gives the B Hessians ``[B, N, N]`` in batched GEMMs.

    Exactly symmetric. ``workspace_bytes`` (0: 64 MiB) bounds the temporaries: half of it for the
    per-sample layer quantities (about width² numbers per pair of layers per sample and point — as many
    points go together as fit with all their samples, and the samples of a point that does not fit go
    in chunks that do, each weighted by its share of the mean), half for a block's products and their
    factors (a block's rows go in chunks that fit). Runs on ``theta``'s device and dtype.
    """
    if theta.dim() not in (1, 2) or theta.shape[-1] != model.n_params:
        raise ValueError(f"theta must be a flat [{model.n_params}] vector (or [B, {model.n_params}] for B points) "
                         f"for {model}, got {tuple(theta.shape)}")
    n = X.shape[0]
    if n == 0:
        raise ValueError("mlp_hessian needs at least one sample: the mean loss over no rows is undefined")
    n_par = model.n_params
    shape = (*theta.shape[:-1], n_par, n_par)
    H = out if out is not None else torch.empty(shape, dtype=theta.dtype, device=theta.device)
    if H.shape != shape:
        raise ValueError(f"out must be {list(shape)}, got {tuple(H.shape)}")
    if not accumulate:
        H.zero_()
    half = 0.5 * (workspace_bytes if workspace_bytes > 0 else DEFAULT_WORKSPACE_BYTES)
    one = theta.dim() == 1  # a point: work on views with a point dimension of 1 (any strides of out)
    thetas, Hs = (theta.detach()[None], H[None]) if one else (theta.detach(), H)
    X = X.to(theta.dtype)
    offsets = model.blocks()
    per_point = _bytes_per_sample(offsets, H.element_size())
    # points whose samples all fit at once, and whose largest one-row block product (see _add_block) does
    row = max(_row_bytes(h_l, d_m, h_m, n, H.element_size()) for _, _, h_l in offsets for _, d_m, h_m in offsets)
    group = max(1, min(int(half // (per_point * n)), int(half // row)))
    per_chunk = max(1, min(n, int(half // per_point)))  # else samples of one point at a time
    for p in range(0, thetas.shape[0], group):
        th, Hp = thetas[p:p + group], Hs[p:p + group]
        for s in range(0, n, per_chunk):  # per_chunk is n where group > 1
            Xc, Yc = X[s:s + per_chunk], Y[s:s + per_chunk]
            _add_samples(Hp, model, th, Xc, Yc, loss, offsets, weight * Xc.shape[0] / n, half)
    _mirror_upper_blocks(Hs, offsets)
    if weight_decay:
        H.diagonal(dim1=-2, dim2=-1).add_(weight * weight_decay)
    return H


def _bytes_per_sample(offsets, itemsize: int) -> int:
    """Memory one sample's layer quantities take at one point at most: Hz^{ll} per layer, ∂z_m/∂z_l for
    one l and all m > l, and a block's Hz^{lm} and ∂ã_{m-1}/∂z_l; plus its inputs ã, σ', σ'' and δ per layer."""
    widths = [h for _, _, h in offsets]
    hz = sum(h * h for h in widths)
    jz = max(sum(widths[l] * h for h in widths[l + 1:]) for l in range(len(widths)))
    block = max(h_l * h_m + d_m * h_l for _, _, h_l in offsets for _, d_m, h_m in offsets)
    return itemsize * (hz + jz + block + sum(d + 3 * h for _, d, h in offsets))


def _row_bytes(h_l: int, d_m: int, h_m: int, n: int, itemsize: int) -> int:
    """What one input row j of the block (layer l, layer m) takes for one point in :func:`_add_block`: its
    products and factors over ``n`` samples."""
    return itemsize * (d_m * h_l * h_m + n * (d_m + h_m))


def _add_samples(H, model, thetas, X, Y, loss, offsets, weight, budget) -> None:
    """H[:, upper blocks] += weight · the Hessians ``[B, N, N]`` of the mean loss over the rows of ``X``,
    ``Y`` at the points ``thetas`` ``[B, N]``."""
    Ws, acts, d1, deltas, Hzz = _layer_quantities(model, thetas, X, Y, loss)
    L = len(Ws)
    for l in range(L):
        Jz = {}  # Jz[m] = ∂z_m/∂z_l, [B, n, h_m, h_l], for m > l
        for m in range(l, L):
            if m > l:  # ∂z_m/∂z_{m-1} = W_mᵀ diag σ'(z_{m-1})
                one_layer = Ws[m].mT[:, None] * d1[m - 1][:, :, None, :]
                Jz[m] = one_layer if m == l + 1 else one_layer @ Jz[m - 1]
            _add_block(H, l, m, acts, d1, deltas, Hzz, Jz, offsets, weight, budget)


def _layer_quantities(model: MLP, thetas: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, loss: str):
    """Per layer, at each of the B points ``thetas`` ``[B, N]``: weights ``[B, h_{l-1}, h_l]``, inputs
    ã_{l-1} ``[B, n, h_{l-1}(+1)]``, σ'(z_l) ``[B, n, h_l]`` (hidden layers), δ_l ``[B, n, h_l]`` and
    Hz^{ll} ``[B, n, h_l, h_l]``, all of the mean loss (the 1/n is in δ_L)."""
    act = ACTIVATIONS[model.activation]
    layers = model.layers(thetas)
    Ws = [W for W, _ in layers]
    b, n, L = thetas.shape[0], X.shape[0], len(layers)
    a, acts, d1, d2 = X.expand(b, *X.shape), [], [], []
    for l, (W, bias) in enumerate(layers):
        acts.append(a if bias is None else torch.cat([a, a.new_ones(b, n, 1)], dim=2))
        z = a @ W if bias is None else a @ W + bias[:, None, :]
        if l < L - 1:
            ones = torch.ones_like(z)
            first = lambda x: jvp(act, (x,), (ones,))[1]  # noqa: E731 — σ' elementwise
            a, s1 = jvp(act, (z,), (ones,))
            d1.append(s1)
            d2.append(jvp(first, (z,), (ones,))[1])  # σ'' elementwise
    delta, Hz = _loss_derivatives(z, Y, loss)  # z is the output f = z_L
    deltas, Hzz = [None] * L, [None] * L
    deltas[-1], Hzz[-1] = delta, Hz
    for l in range(L - 2, -1, -1):
        W = Ws[l + 1][:, None]  # [B, 1, h_l, h_{l+1}]: one matrix per point, shared by its samples
        back = deltas[l + 1] @ Ws[l + 1].mT  # [B, n, h_l]
        deltas[l] = d1[l] * back
        G = W @ Hzz[l + 1] @ W.mT  # W Hz Wᵀ, [B, n, h_l, h_l]
        Hzz[l] = d1[l][..., :, None] * G * d1[l][..., None, :] + torch.diag_embed(d2[l] * back)
    return Ws, acts, d1, deltas, Hzz


def _loss_derivatives(f: torch.Tensor, Y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """∂ℓ/∂f ``[..., n, k]`` and ∂²ℓ/∂f² ``[..., n, k, k]`` of the mean loss over the ``n`` rows of ``f``."""
    n, k = f.shape[-2:]
    if loss == "mse":
        eye = torch.eye(k, dtype=f.dtype, device=f.device)
        return (f - Y.to(f.dtype)) / n, eye.expand(*f.shape, k) / n
    if loss == "cross_entropy":
        p = torch.softmax(f, dim=-1)
        onehot = torch.nn.functional.one_hot(Y.long(), k).to(f.dtype)
        return (p - onehot) / n, (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) / n
    raise ValueError(f"unknown loss {loss!r}: expected mse or cross_entropy")


def _add_block(H, l, m, acts, d1, deltas, Hzz, Jz, offsets, weight, budget) -> None:
    """H[:, block l, block m] += weight · Σ_n ã_{l-1} ⊗ K_n (see the module docstring), for l ≤ m, at
    each of the B points. ``Jz[m']`` is ∂z_{m'}/∂z_l ``[B, n, h_{m'}, h_l]`` for l < m' ≤ m.

    The two terms of K go as two batched GEMMs over the samples whose factors are small —
    (ã_{l-1} ⊗ ã_{m-1}) against Hz^{lm}, and (ã_{l-1} ⊗ δ_m) against ∂ã_{m-1}/∂z_l — and their products
    are permuted into the block's (j, i), (q, p) layout as they are added. Input rows j go in chunks
    whose products and factors fit ``budget`` bytes."""
    (r0, d_l, h_l), (c0, d_m, h_m) = offsets[l], offsets[m]
    b, n = acts[l].shape[:2]
    block = H[:, r0:r0 + d_l * h_l, c0:c0 + d_m * h_m].view(b, d_l, h_l, d_m, h_m)  # [B, j, i, q, p]
    hz = (Hzz[m] if m == l else Jz[m].mT @ Hzz[m]).reshape(b, n, h_l * h_m)  # Hz^{lm}, [B, n, (i, p)]
    if m > l:  # ∂ã_{m-1}/∂z_l, [B, n, (q, i)]; the bias entry of ã is constant
        da = torch.diag_embed(d1[l]) if m == l + 1 else d1[m - 1][..., :, None] * Jz[m - 1]
        da = torch.nn.functional.pad(da, (0, 0, 0, d_m - da.shape[2])).reshape(b, n, d_m * h_l)
    a_l, a_m, delta = acts[l], acts[m], deltas[m]
    per_row = b * _row_bytes(h_l, d_m, h_m, n, H.element_size())  # one row j's products and factors
    chunk = max(1, min(d_l, int(budget // per_row)))
    for j in range(0, d_l, chunk):
        a = a_l[:, :, j:j + chunk]
        c = a.shape[2]
        aa = (a[..., :, None] * a_m[..., None, :]).reshape(b, n, c * d_m)  # ã_{l-1} ⊗ ã_{m-1}, [B, n, (j, q)]
        block[:, j:j + c].add_((aa.mT @ hz).view(b, c, d_m, h_l, h_m).permute(0, 1, 3, 2, 4), alpha=weight)
        if m > l:
            ad = (a[..., :, None] * delta[..., None, :]).reshape(b, n, c * h_m)  # ã_{l-1} ⊗ δ_m, [B, n, (j, p)]
            block[:, j:j + c].add_((da.mT @ ad).view(b, d_m, h_l, c, h_m).permute(0, 3, 2, 1, 4), alpha=weight)


def _mirror_upper_blocks(H: torch.Tensor, offsets) -> None:
    """Fill the blocks below the diagonal (layer m > l) of each ``H`` ``[B, N, N]`` with the transposes of
    those above, then make the diagonal blocks exactly symmetric (their two triangles differ by rounding)."""
    for l, (r0, d_l, h_l) in enumerate(offsets):
        size = d_l * h_l
        for c0, d_m, h_m in offsets[l + 1:]:
            H[:, c0:c0 + d_m * h_m, r0:r0 + size].copy_(H[:, r0:r0 + size, c0:c0 + d_m * h_m].mT)
        symmetrize_(H[:, r0:r0 + size, r0:r0 + size])
