"""Validation: the blocked LDLᵀ's counts (pipeline.numerics.block_ldl) against eigvalsh on a stress set.

Matrices: random spectra rotated by a random orthogonal Q (Gaussian; PSD with a large null space and a
few small negatives; eigenvalues planted at ±tol·(1 ± δ); log-uniform over 16 decades of both signs;
[[0, B], [Bᵀ, 0]] in its natural order), and closed-form Hessians of small MLPs (tanh, ReLU, softplus;
random targets, classes, and a teacher's own outputs: an exact minimum). For each, rel_tol 1e-3, 1e-6
and 1e-9 of max|λ| (the planted ones: their own tol), it counts #{λ > tol} and #{λ < −tol} with two
blocked factorisations (atol = inertia.BLOCKED_ACCURACY · tol) and prints every case that gave up (the
pipeline then uses Bunch–Kaufman) or disagreed with eigvalsh, with the distance of the nearest
eigenvalue to ±tol in units of tol: within 1e-3 the blocked count may go either way by design.

    python scripts/validate_block_ldl.py --block 64
"""
from __future__ import annotations

import argparse

import torch

from pipeline.numerics import block_ldl
from pipeline.curvature import inertia
from pipeline.curvature import hessian as hs
from pipeline.curvature.models import MLP
from pipeline.curvature.problem import MeanLoss

F64 = torch.float64


def random_spectra(cases: int, delta: float):
    g = torch.Generator().manual_seed(0)
    for trial in range(cases):
        n = int(torch.randint(50, 900, (), generator=g))
        kind = trial % 5
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        lam = torch.randn(n, generator=g, dtype=F64)
        tol = None
        if kind == 1:  # PSD-ish: a fifth of the spectrum positive, a few small negatives, the rest zero
            r = n // 5
            lam = torch.zeros(n, dtype=F64)
            lam[:r] = torch.rand(r, generator=g, dtype=F64) ** 4
            lam[r:r + r // 4] = -1e-3 * torch.rand(r // 4, generator=g, dtype=F64)
        elif kind == 2:  # a tenth planted just inside and just outside ±tol
            tol, m = 1e-6, n // 10
            side = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0).to(F64)
            lam[:m] = tol * (1 + delta * side)
            lam[m:2 * m] = -lam[:m]
        elif kind == 3:
            lam = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(F64) \
                * 10 ** (-16 * torch.rand(n, generator=g, dtype=F64))
        if kind == 4:
            half = n // 2
            H = torch.zeros(n, n, dtype=F64)
            H[:half, half:] = torch.randn(half, n - half, generator=g, dtype=F64)
            H[half:, :half] = H[:half, half:].T
        else:
            H = (Q * lam) @ Q.T
            H = (H + H.T) / 2
        yield f"random kind {kind}, N = {n}", H, tol


def network_hessians():
    for act in ("tanh", "relu", "softplus"):
        for width, depth in ((20, 2), (40, 2), (30, 3)):
            model = MLP(16, 4, depth=depth, width=width, activation=act)
            theta = model.init(width + depth)
            g = torch.Generator().manual_seed(1)
            X = torch.randn(256, 16, generator=g, dtype=F64)
            Y = torch.randn(256, 4, generator=g, dtype=F64)
            c = torch.randint(0, 4, (256,), generator=g)
            tag = f"{act} 16-{width}×{depth}-4"
            yield f"{tag}, random targets", hs.hessian(MeanLoss(model, X, Y, "mse"), theta), None
            yield f"{tag}, classes", hs.hessian(MeanLoss(model, X, c, "cross_entropy"), theta), None
            yield f"{tag}, teacher", hs.hessian(MeanLoss(model, X[:7], model.forward(theta, X[:7]), "mse"), theta), None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block", type=int, default=64, help="window (the pipeline's: 512, batches 32)")
    ap.add_argument("--random", type=int, default=40, help="random-spectrum matrices")
    ap.add_argument("--delta", type=float, default=1e-6, help="planted eigenvalues at tol·(1 ± delta)")
    args = ap.parse_args(argv)
    total = wrong = gave_up = 0
    for name, H, planted_tol in list(random_spectra(args.random, args.delta)) + list(network_hessians()):
        lam = torch.linalg.eigvalsh(H)
        scale = float(lam.abs().max())
        for tol in ([planted_tol] if planted_tol else [r * scale for r in (1e-3, 1e-6, 1e-9)]):
            want = (int((lam > tol).sum()), int((lam < -tol).sum()))
            got = []
            for shift in (-tol, tol):
                M = H.clone()
                M.diagonal().add_(shift)
                got.append(block_ldl.inertia_(M, atol=inertia.BLOCKED_ACCURACY * tol, block=args.block))
            total += 1
            near = float(torch.minimum((lam - tol).abs(), (lam + tol).abs()).min()) / tol
            if None in got:
                gave_up += 1
                print(f"gave up   {name}, tol {tol / scale:.0e}·max|λ|")
            elif (got[0][0], got[1][1]) != want:
                wrong += 1
                print(f"DIFFERS   {name}, tol {tol / scale:.0e}·max|λ|: eigvalsh {want}, blocked "
                      f"{(got[0][0], got[1][1])}; nearest eigenvalue {near:.0e}·tol from ±tol")
    print(f"\n{total} cases, window {args.block}: {total - wrong - gave_up} agree with eigvalsh, "
          f"{gave_up} gave up (Bunch–Kaufman counts those), {wrong} differ")


if __name__ == "__main__":
    main()
