"""Benchmark of the HVP-only count estimator (:mod:`pipeline.curvature.estimate`) against exact counts, and of SLQ
"as PyHessian computes it", on the same checkpoints.

    python scripts/bench_estimate.py                  # CPU: N ≈ 2.7k checkpoints + time to ±0.02 at N ≈ 10⁴
    python scripts/bench_estimate.py --device cuda --parts gpu   # N ≈ 10⁵ and 10⁶ on one GPU (< 3 min)
    python scripts/bench_estimate.py --quick          # a smaller grid, for a smoke run

1. Checkpoints: stalled points of real pipeline runs (:func:`pipeline.orchestration.train.train` on the real Hydra config),
   exact spectra by :func:`pipeline.curvature.hessian.spectrum_at` (float64 ``eigh``).
2. Estimator error, interval and time against the Chebyshev degree and the number of probes, at
   tolerances rel·max|λ| — or "refused" where the tolerance is finer than the resolution.
3. SLQ as PyHessian computes it, written here from its description: Rademacher start vectors, ``steps``
   Lanczos steps with full reorthogonalisation, nodes = Ritz values, weights = squared first components,
   a Gaussian of variance σ² = 1e-5·max(1, λ-range) on each node; the share of eigenvalues above t is the
   broadened density's mass above t, averaged over ``n_v`` runs. Run in float64 and float32.
4. Time until the minimum-ratio interval is ±0.02: N ≈ 10⁴ on the CPU; 10⁵ and 10⁶ with ``--device cuda``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np
import torch
from scipy.stats import norm

from pipeline.curvature import estimate
from pipeline.numerics.chebyshev import min_degree
from pipeline.curvature.data import synthetic
from pipeline.curvature.hessian import spectrum_at
from pipeline.numerics.lanczos import lanczos, ritz
from pipeline.curvature.models import MLP, loss_value

REL_TOLS = (1e-6, 1e-5, 1e-4, 1e-3)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- checkpoints from the real pipeline

def pipeline_checkpoints(overrides: list[str], seed: int = 0):
    """Checkpoints (stalled and final) of one run of the real Hydra config with ``overrides``:
    ``[(label, problem, theta)]``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.orchestration.config import register_configs
    from pipeline.orchestration.train import run_problem
    from pipeline.orchestration.train import train

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("pipeline.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    result = train(cfg, seed)
    problem = run_problem(cfg, seed)
    return [(f"{cfg.data.name}-{problem.model.n_params}@{ck.step}", problem, ck.theta.to(torch.float64))
            for ck in result.checkpoints]


CPU_RUNS = [
    # teacher–student regression, 4-48-48-1 tanh (N = 2,641), Adam to its stalls
    ["data=synthetic", "model.width=48", "model.depth=2", "optim=adam", "optim.lr=0.003",
     "optim.max_steps=3000", "stall.window=500", "stall.threshold=0.02"],
    # digits 4×4, one-hot MSE, 16-40-40-10 tanh (N = 2,730), gradient descent
    ["data=digits", "data.n_samples=512", "model.width=40", "model.depth=2", "optim=gd", "optim.lr=0.5",
     "optim.max_steps=3000", "stall.window=500", "stall.threshold=0.02"],
]
CPU_10K_RUN = ["data=synthetic", "data.n_features=16", "data.n_samples=512", "model.width=96", "model.depth=2",
               "optim=adam", "optim.lr=0.003", "optim.max_steps=1500", "stall.window=500",
               "stall.threshold=0.02", "stall.max_stalls=1"]


# ---------------------------------------------------------------- SLQ, PyHessian-style

def slq_share_above(matvec, n: int, thresholds, *, steps: int, n_v: int, seed: int, dtype, device) -> np.ndarray:
    """Share of eigenvalues above each threshold read off a Gaussian-broadened SLQ density (see module doc)."""
    shares = np.zeros(len(thresholds))
    for run in range(n_v):
        g = torch.Generator().manual_seed(seed * 1000 + run)
        v0 = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)
        alpha, beta, _ = lanczos(matvec, n, steps, v0=v0, dtype=dtype, device=device)
        nodes, S, _ = ritz(alpha, beta)
        weights = S[0] ** 2
        sigma = math.sqrt(1e-5 * max(1.0, float(nodes.max() - nodes.min())))
        shares += np.array([float(weights @ norm.sf((t - nodes) / sigma)) for t in thresholds])
    return shares / n_v


# ---------------------------------------------------------------- parts of the report

def exact_part(problem, theta):
    loss = problem.loss_fn()
    t0 = time.perf_counter()
    lam = spectrum_at(loss, theta, method="eigh", tol=0.0).eigenvalues
    return lam, time.perf_counter() - t0


def estimator_grid(label, problem, theta, lam, degrees, probe_counts, rows):
    n = theta.numel()
    top = float(np.abs(lam).max())
    mv = estimate.hvp_matvec(problem.loss_fn(), theta)
    t0 = time.perf_counter()
    d = estimate.deflation(mv, n, seed=0)
    t_defl = time.perf_counter() - t0
    print(f"  deflation: {d.values.size} outliers, range [{d.spectral_range[0]:.3g}, {d.spectral_range[1]:.3g}] "
          f"(λmax {d.lam_max:.4g}), {d.matvecs} matvecs, {t_defl:.1f} s")
    print(f"  {'degree':>6} {'probes':>6} {'rel_tol':>7} {'exact':>6} {'estimate':>8} {'interval':>15} "
          f"{'cover':>5} {'half':>6} {'resol.':>8} {'seconds':>7}")
    for degree in degrees:
        for k in probe_counts:
            t0 = time.perf_counter()
            sk = estimate.sketch(mv, n, d, degree=degree, n_probes=k, seed=degree + k)
            secs = time.perf_counter() - t0 + t_defl
            for rel in REL_TOLS:
                tol = rel * top
                exact = float((lam > tol).mean())
                row = dict(checkpoint=label, n=n, degree=degree, probes=k, rel_tol=rel, exact=exact, seconds=secs)
                try:
                    e = estimate.counts(sk, tol=tol)
                except ValueError:
                    need = min_degree(*d.spectral_range, tol)
                    row.update(refused=True, resolution=sk.resolution(tol), degree_needed=need)
                    print(f"  {degree:>6} {k:>6} {rel:>7.0e} {exact:>6.3f} {'refused':>8} {f'needs {need}':>15} "
                          f"{'':>5} {'':>6} {row['resolution'] / top:>8.1e} {secs:>7.1f}")
                    rows.append(row)
                    continue
                lo, hi = e.min_ratio_ci
                row.update(refused=False, estimate=e.min_ratio, lo=lo, hi=hi, covered=lo <= exact <= hi,
                           half=(hi - lo) / 2, resolution=e.resolution)
                rows.append(row)
                print(f"  {degree:>6} {k:>6} {rel:>7.0e} {exact:>6.3f} {e.min_ratio:>8.3f} [{lo:.3f}, {hi:.3f}] "
                      f"{'yes' if row['covered'] else 'NO':>5} {row['half']:>6.3f} {e.resolution / top:>8.1e} "
                      f"{secs:>7.1f}")


def slq_part(label, problem, theta, lam, steps_list, nv_list, rows, seeds=5):
    n = theta.numel()
    top = float(np.abs(lam).max())
    thresholds = [0.0] + [r * top for r in REL_TOLS]
    exact = [float((lam > t).mean()) for t in thresholds]
    print(f"  exact share above 0 / {' / '.join(f'{r:.0e}' for r in REL_TOLS)}·λmax: "
          + " / ".join(f"{x:.3f}" for x in exact))
    for dtype in (torch.float64, torch.float32):
        p = problem.to("cpu", dtype)
        mv = estimate.hvp_matvec(p.loss_fn(), theta.to(dtype))
        for steps in steps_list:
            for n_v in nv_list:
                t0 = time.perf_counter()
                runs = np.array([slq_share_above(mv, n, thresholds, steps=steps, n_v=n_v, seed=s, dtype=dtype,
                                                 device="cpu") for s in range(seeds)])
                secs = (time.perf_counter() - t0) / seeds
                mean, spread = runs.mean(0), runs.std(0, ddof=1)
                rows.append(dict(checkpoint=label, n=n, method="slq", dtype=str(dtype).split(".")[-1], steps=steps,
                                 n_v=n_v, exact=exact, mean=mean.tolist(), spread=spread.tolist(), seconds=secs))
                print(f"  SLQ {str(dtype).split('.')[-1]:>7} steps={steps:<4} n_v={n_v:<3} share: "
                      + " / ".join(f"{m:.3f}±{s:.3f}" for m, s in zip(mean, spread))
                      + f"  (bias at 0: {mean[0] - exact[0]:+.3f}; {secs:.1f} s per estimate)")


def time_to_target(label, mv, n, rel_tol, *, target, budget_s, device, dtype, rows, probes0=8, eigenvalues=None):
    """Raise the degree (band-limited) or the probes (variance-limited) until the minimum-ratio interval
    is ±``target``; report the time of the final configuration and of the whole search."""
    t_start = time.perf_counter()
    d = estimate.deflation(mv, n, seed=0, dtype=dtype, device=device)
    sync(device)
    t_defl = time.perf_counter() - t_start
    tol = rel_tol * max(abs(d.lam_min), abs(d.lam_max))
    a, b = d.spectral_range
    # Start from the least degree that resolves tol at all; double it while the ambiguous band dominates.
    degree, k = max(64, int(1.25 * min_degree(a, b, tol))), probes0
    print(f"  {label}: N={n:,}, λ∈[{d.lam_min:.3g}, {d.lam_max:.3g}], deflated {d.values.size}, "
          f"range [{a:.3g}, {b:.3g}], tol={tol:.3g} ({rel_tol:.0e}·max|λ|), deflation {t_defl:.1f} s")
    # One probe block through the operator, timed, predicts a sketch: ⌈degree/2⌉ such calls.
    block = torch.ones(n, probes0, dtype=dtype, device=device)
    t0 = time.perf_counter()
    mv(block)
    sync(device)
    t_block = time.perf_counter() - t0
    while True:
        predicted = (degree + 1) // 2 * t_block * k / probes0
        if degree > 16384:
            print(f"    stop: degree {degree} above 16384")
            break
        if time.perf_counter() - t_start + predicted > budget_s:
            print(f"    stop: degree {degree} with {k} probes would take ~{predicted:.0f} s, over the search "
                  f"budget of {budget_s:.0f} s")
            break
        t0 = time.perf_counter()
        sk = estimate.sketch(mv, n, d, degree=degree, n_probes=k, seed=degree + k)
        sync(device)
        secs = time.perf_counter() - t0
        e = estimate.counts(sk, tol=tol)
        lo, hi = e.min_ratio_ci
        half, band = (hi - lo) / 2, max(e.n_ambiguous_pos, 0.0) / n
        total = time.perf_counter() - t_start
        exact = "" if eigenvalues is None else f" exact {(eigenvalues > tol).mean():.4f}"
        print(f"    degree {degree:>5} probes {k:>3}: ratio {e.min_ratio:.4f} [{lo:.4f}, {hi:.4f}]{exact} "
              f"half {half:.4f} (band {band:.4f}); {secs:.1f} s + deflation {t_defl:.1f} s; "
              f"search so far {total:.1f} s")
        rows.append(dict(checkpoint=label, n=n, rel_tol=rel_tol, degree=degree, probes=k, estimate=e.min_ratio,
                         lo=lo, hi=hi, half=half, band=band, seconds=secs + t_defl, search_seconds=total,
                         device=device_name(device)))
        if half <= target:
            print(f"    → ±{target} reached: {secs + t_defl:.1f} s at these settings ({total:.1f} s with the search)")
            break
        if band / 2 > 0.6 * target:  # the ambiguous band, not the probes, keeps the interval wide
            degree *= 2
        else:
            k *= 2


def big_mlp(n_target: int, device: str, dtype, train_steps: int, seed: int = 0):
    """An MLP 64-w-w-10 of about ``n_target`` parameters on 2,048 teacher–student samples after
    ``train_steps`` Adam steps (lr 1e-3): a trained point, not necessarily a stall, to time the estimator."""
    d_in, d_out, n_samples = 64, 10, 2048
    # 64w + w + w² + w + 10w + 10 = n  →  w² + 76w + 10 − n = 0
    w = int((-76 + math.sqrt(76 ** 2 + 4 * (n_target - 10))) / 2)
    model = MLP(d_in, d_out, depth=2, width=w, activation="tanh")
    X, Y = synthetic(seed, n_samples, d_in, d_out, 32)
    X, Y = torch.as_tensor(X, dtype=dtype, device=device), torch.as_tensor(Y, dtype=dtype, device=device)
    theta = model.init(seed, dtype).to(device).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=1e-3)
    for _ in range(train_steps):
        opt.zero_grad()
        loss_value(model, theta, X, Y, "mse").backward()
        opt.step()
    theta = theta.detach()
    return model.n_params, (lambda t: loss_value(model, t, X, Y, "mse")), theta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a small grid (smoke run)")
    ap.add_argument("--parts", default="grid,target",
                    help="comma list: grid (sections 1-3), target (section 4 on the CPU), gpu (section 4 at "
                         "N = 10⁵ and 10⁶ on --device cuda)")
    ap.add_argument("--json", default="", help="write every row to this JSON file")
    ap.add_argument("--gpu-budget", type=float, default=150.0, help="seconds for the whole gpu part")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    print(f"device: {device_name('cpu')}" + (f"; {device_name(args.device)}" if args.device != "cpu" else ""))
    rows = {"grid": [], "slq": [], "target": []}
    if "grid" in parts:
        grid_and_slq(args.quick, rows)
    if parts & {"target", "gpu"}:
        print("\n== 4. time to a ±0.02 interval on the minimum ratio ==")
    if "target" in parts:
        cpu_targets(args.quick, rows)
    if "gpu" in parts:
        gpu_targets(args.device, args.gpu_budget, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)


def grid_and_slq(quick: bool, rows: dict) -> None:
    degrees = (250, 1000) if quick else (250, 500, 1000, 2000)
    probe_counts = (10,) if quick else (10, 30)
    print("\n== 1-3. estimator and SLQ against exact counts (CPU, float64) ==")
    for overrides in CPU_RUNS[:1] if quick else CPU_RUNS:
        cks = pipeline_checkpoints(overrides)
        for label, problem, theta in cks[-1:] if quick else cks[-2:]:
            lam, t_exact = exact_part(problem, theta)
            top = float(np.abs(lam).max())
            print(f"\n{label}: N={lam.size:,}, exact eigh {t_exact:.1f} s; λ ∈ [{lam.min():.3g}, {lam.max():.3g}]; "
                  "exact min ratio at 0 / " + " / ".join(f"{r:.0e}" for r in REL_TOLS) + "·λmax: "
                  + " / ".join(f"{(lam > r * top).mean():.3f}" for r in (0.0,) + REL_TOLS))
            estimator_grid(label, problem, theta, lam, degrees, probe_counts, rows["grid"])
            slq_part(label, problem, theta, lam, (20, 100) if not quick else (100,),
                     (1, 10) if not quick else (1,), rows["slq"], seeds=5 if not quick else 3)


def cpu_targets(quick: bool, rows: dict) -> None:
    # N ≈ 2.7k digits checkpoint (exact counts known): the hard case of the grid, where degree ≤ 2000 refuses.
    label, problem, theta = pipeline_checkpoints(CPU_RUNS[1])[-1]
    lam = spectrum_at(problem.loss_fn(), theta, method="eigh", tol=0.0).eigenvalues
    mv = estimate.hvp_matvec(problem.loss_fn(), theta)
    time_to_target(f"cpu {label}", mv, theta.numel(), 1e-3, target=0.02, budget_s=60 if quick else 240,
                   device="cpu", dtype=torch.float64, rows=rows["target"], eigenvalues=lam)
    label, problem, theta = pipeline_checkpoints(CPU_10K_RUN)[-1]
    mv = estimate.hvp_matvec(problem.loss_fn(), theta)
    for rel in (1e-3, 1e-4, 1e-5):
        time_to_target(f"cpu {label}", mv, theta.numel(), rel, target=0.02, budget_s=60 if quick else 240,
                       device="cpu", dtype=torch.float64, rows=rows["target"])


def gpu_targets(device: str, budget_s: float, rows: dict) -> None:
    """N ≈ 10⁶ and 10⁵ MLPs after 1,500 Adam steps, tolerances 1e-3 and 1e-4·max|λ|; the whole part stops
    starting new sketches after ``budget_s`` seconds (default 150: under 3 minutes with training)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit(f"--parts gpu needs --device cuda and a CUDA device, got --device {device}")
    deadline = time.perf_counter() + budget_s
    for n_target in (1_000_000, 100_000):  # the headline size first, in case the budget runs out
        t0 = time.perf_counter()
        n, loss, theta = big_mlp(n_target, device, torch.float64, train_steps=1500)
        sync(device)
        print(f"  (trained N={n:,} for 1500 Adam steps in {time.perf_counter() - t0:.1f} s, "
              f"loss {float(loss(theta)):.3g})")
        mv = estimate.hvp_matvec(loss, theta)
        for rel in (1e-3, 1e-4):
            left = deadline - time.perf_counter()
            if left <= 0:
                print(f"  {device} mlp-{n} at {rel:.0e}: skipped, GPU budget spent")
                continue
            time_to_target(f"{device} mlp-{n}", mv, n, rel, target=0.02, budget_s=min(left, budget_s / 3),
                           device=device, dtype=torch.float64, rows=rows["target"])

if __name__ == "__main__":
    main()
