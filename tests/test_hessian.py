"""The Hessian build and spectrum_at against oracles: torch.autograd.functional.hessian and eigvalsh in float64,
closed forms from SCIENCE.md, planted spectra; batched, chunked, multi-batch and float32 builds; the
out-of-memory fallback of spectra_at_many; CUDA against CPU where a GPU exists."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.curvature import hessian as hs, hessian_build
from pipeline.curvature.data import Dataset
from pipeline.curvature.models import MLP
from pipeline.curvature.problem import Problem

F64 = torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")

# (model, samples, loss, weight decay): one row per kind of network the sweeps use.
CASES = [
    (MLP(5, 3, depth=2, width=6, activation="tanh"), 40, "mse", 0.0),
    (MLP(4, 3, depth=1, width=9, activation="relu"), 50, "mse", 1e-3),
    (MLP(6, 4, depth=2, width=5, activation="softplus"), 30, "cross_entropy", 1e-4),
    (MLP(3, 2, depth=1, width=7, activation="swish", bias=False), 25, "mse", 0.0),
]
IDS = [f"{m.activation}-{loss}-N{m.n_params}" for m, _, loss, _ in CASES]


def _problem(model: MLP, n: int, loss: str, wd: float, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, model.in_dim, generator=g, dtype=F64)
    if loss == "cross_entropy":
        return Problem(model, Dataset(X, torch.randint(0, model.out_dim, (n,), generator=g), model.out_dim), loss, wd)
    return Problem(model, Dataset(X, torch.randn(n, model.out_dim, generator=g, dtype=F64), 0), loss, wd)


def _oracle(loss_fn, theta):
    return torch.autograd.functional.hessian(loss_fn, theta)


def _close(a, b, tol=1e-10):
    """Equal to ``tol`` relative to the larger matrix's scale (float64 builds differ by ~1e-16)."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("hvp", ["rev", "fwd"])
def test_chunked_build_equals_unchunked_and_autograd(case, hvp):
    model, n, loss, wd = case
    prob = _problem(model, n, loss, wd)
    f, theta = prob.loss_fn(), model.init(1)
    ref = _oracle(f, theta)
    whole = hs.hessian(f, theta, chunk_size=model.n_params, hvp=hvp)
    _close(whole, ref)
    assert torch.equal(whole, whole.T)  # symmetrised exactly
    for chunk in (1, 7):
        _close(hs.hessian(f, theta, chunk_size=chunk, hvp=hvp), ref)
    _close(hs.hessian(f, theta, hvp=hvp), ref)  # default chunk from the workspace


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_batched_multi_point_hessians_equal_one_by_one(case):
    model, n, loss, wd = case
    f = _problem(model, n, loss, wd).loss_fn()
    thetas = torch.stack([model.init(s) for s in range(4)])
    for chunk in (0, 5):
        H = hs.hessians(f, thetas, chunk_size=chunk)
        assert H.shape == (4, model.n_params, model.n_params)
        for k in range(4):
            _close(H[k], _oracle(f, thetas[k]))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multi_batch_weighted_terms_equal_one_big_batch(case):
    """Problem.batched_loss_terms: n_b/n weights, L2 once — what the Hessian job feeds spectra_at_many."""
    model, n, loss, wd = case
    prob = _problem(model, n, loss, wd)
    theta = model.init(2)
    terms = prob.batched_loss_terms(batch_size=n // 3)
    assert len(terms) >= 3
    _close(hs.hessian(terms, theta), _oracle(prob.loss_fn(), theta))
    _close(hs.hessian(terms, theta, chunk_size=4, hvp="fwd"), hs.hessian(prob.loss_fn(), theta))


def test_float32_build_is_within_the_documented_noise_floor():
    model = MLP(8, 3, depth=2, width=12, activation="tanh")
    prob = _problem(model, 200, "mse", 0.0)
    theta = model.init(3)
    lam64 = np.linalg.eigvalsh(hs.hessian(prob.loss_fn(), theta).numpy())
    p32 = prob.to("cpu", torch.float32)
    H32 = hs.hessian(p32.loss_fn(), theta.float())
    assert H32.dtype == torch.float32
    lam32 = np.linalg.eigvalsh(H32.double().numpy())
    floor = hs.REL_NOISE_FLOOR[torch.float32]
    err = np.abs(lam32 - lam64).max() / np.abs(lam64).max()
    assert 1e-12 < err <= floor  # float32 rounding is visible, and below the floor
    res = hs.spectrum_at(p32.loss_fn(), theta.float(), dtype=None, method="eigh", rel_tol=1e-9, tol_mode="rel")
    assert res.dtype == "float32" and res.tol >= floor * np.abs(lam64).max() * (1 - 1e-5)


def _saddle_loss(w):
    return (1 - w[0] * w[1]) ** 2


@pytest.mark.parametrize("method", ["eigh", "inertia"])
@pytest.mark.parametrize("point,eigs,label", [
    ((0.0, 0.0), [-2.0, 2.0], "saddle"),
    ((1.0, 1.0), [0.0, 4.0], "degenerate_minimum"),
    ((2.0, 0.5), [0.0, 8.5], "degenerate_minimum"),
])
def test_closed_form_two_weight_product(method, point, eigs, label):
    res = hs.spectrum_at(_saddle_loss, torch.tensor(point, dtype=F64), method=method)
    assert res.label == label and res.n_params == 2
    if method == "eigh":
        np.testing.assert_allclose(res.eigenvalues, eigs, atol=1e-12)
    else:
        assert res.eigenvalues is None
        assert res.lam_min == pytest.approx(eigs[0], abs=1e-12) and res.lam_max == pytest.approx(eigs[1], abs=1e-12)
    if label == "degenerate_minimum":
        assert (res.n_pos, res.n_neg, res.n_zero) == (1, 0, 1)
        assert res.min_ratio == 0.5 and res.min_ratio_naive == 0.5 and res.min_ratio_curved == 1.0
    else:
        assert (res.n_pos, res.n_neg, res.n_zero) == (1, 1, 0) and res.index == 0.5
    assert res.grad_norm == pytest.approx(0.0, abs=1e-12)


def test_quadratic_returns_its_planted_spectrum_including_tiny_eigenvalues():
    lam = torch.tensor([5.0, 3.0, 1e-3, -2.0, 1e-9, -1e-9, 2e-10, -3e-10, 7e-3, -4e-3], dtype=F64)
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2

    def quad(t):
        return 0.5 * t @ (A @ t)

    theta = torch.randn(10, generator=g, dtype=F64)
    res = hs.spectrum_at(quad, theta, method="eigh")
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam.numpy()), rtol=0, atol=1e-13)
    # a clear gap between 1e-9 and 1e-3: the tolerance sits in it, the ±1e-9 are zeros
    assert res.tol_method == "gap" and 1e-9 < res.tol < 1e-3
    assert (res.n_pos, res.n_neg, res.n_zero, res.n_pos_naive) == (4, 2, 4, 6)
    counts = hs.spectrum_at(quad, theta, method="inertia", tol=res.tol)
    assert (counts.n_pos, counts.n_neg, counts.n_zero) == (4, 2, 4)
    assert counts.lam_min == pytest.approx(-2.0, abs=1e-9) and counts.lam_max == pytest.approx(5.0, abs=1e-9)
    assert res.grad_norm == pytest.approx(float(torch.linalg.vector_norm(A @ theta)), rel=1e-12)


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_eigh_and_inertia_agree_on_network_hessians(case):
    model, n, loss, wd = case
    f = _problem(model, n, loss, wd).loss_fn()
    theta = model.init(5)
    full = hs.spectrum_at(f, theta, method="eigh", tol_mode="rel")
    counts = hs.spectrum_at(f, theta, method="inertia", tol=full.tol)
    assert (counts.n_pos, counts.n_neg, counts.n_zero) == (full.n_pos, full.n_neg, full.n_zero)
    ref = np.linalg.eigvalsh(_oracle(f, theta).numpy())
    np.testing.assert_allclose(full.eigenvalues, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    rel = hs.spectrum_at(f, theta, method="inertia")  # tolerance from Lanczos' max|λ|
    assert rel.tol == pytest.approx(full.tol, rel=1e-8)
    lean = hs.spectrum_at(f, theta, method="inertia", tol=full.tol, naive=False)  # two LDLᵀ, not three
    assert (lean.n_pos, lean.n_neg, lean.n_zero) == (full.n_pos, full.n_neg, full.n_zero)
    assert lean.n_pos_naive is None and counts.n_pos_naive is not None and np.isnan(lean.min_ratio_naive)


def _loss_for(prob: Problem, calls: list, oom_first: int = 0, where: str = "cuda"):
    """``loss_for`` as jobs.py builds it; the first ``oom_first`` losses it hands out run out of memory
    when evaluated: a torch.OutOfMemoryError as from CUDA, or (``where="cpu"``) a real allocation the
    CPU cannot hold, which torch reports as a plain RuntimeError."""
    def loss_for(device, dtype):
        calls.append(str(device))
        real = prob.to(device, dtype).batched_loss_terms(prob.data.n // 2)
        if len(calls) > oom_first:
            return real

        def boom(theta):
            if where == "cpu":
                torch.empty(2**50, dtype=F64)  # 8 PiB
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [(1.0, boom)]
    return loss_for


def test_spectra_at_many_matches_spectrum_at_batched_or_not():
    model, n, loss, wd = CASES[0]
    prob = _problem(model, n, loss, wd)
    thetas = torch.stack([model.init(s) for s in range(5)])
    ref = [hs.spectrum_at(prob.loss_fn(), t, method="eigh") for t in thetas]
    for batch_points, budget in ((True, 0.0), (False, 0.0), (True, 0.05)):  # 0.05 MiB: one point per pass
        got, fallback = hs.spectra_at_many(_loss_for(prob, []), thetas, method="eigh",
                                           batch_points=batch_points, memory_budget_mb=budget)
        assert fallback is None and len(got) == 5
        for a, b in zip(got, ref):
            assert (a.n_pos, a.n_neg, a.n_zero, a.label) == (b.n_pos, b.n_neg, b.n_zero, b.label)
            np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=1e-10 * np.abs(b.eigenvalues).max())
            assert a.loss == pytest.approx(b.loss, rel=1e-12) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-9)
            assert set(a.seconds) == {"build", "count"}
    counts, _ = hs.spectra_at_many(_loss_for(prob, []), thetas, method="inertia", batch_points=True)
    assert [(c.n_pos, c.n_neg, c.n_zero) for c in counts] == [(r.n_pos, r.n_neg, r.n_zero) for r in ref]
    assert all(c.eigenvalues is None for c in counts)


@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_vectors_give_the_gradient_in_the_eigenbasis_and_the_lowest_eigenvector(dtype, rtol):
    """vectors=True (what the pipeline's honest label needs) keeps Vᵀg and v_min, checked against the
    autograd Hessian: Σc² = ‖g‖², Σλc² = gᵀHg, Σλ²c² = ‖Hg‖² (sign- and basis-free), Hv_min = λmin·v_min;
    the same numbers from spectra_at_many's pass (several points, one eigh each) and from spectrum_at, and
    the eigenvalues those of eigvalsh."""
    model, n, loss, wd = CASES[0]
    prob = _problem(model, n, loss, wd)
    thetas = torch.stack([model.init(s) for s in range(3)])
    got, _ = hs.spectra_at_many(_loss_for(prob, []), thetas, method="eigh", dtype=dtype, vectors=True)
    alone = [hs.spectrum_at(prob.to("cpu", dtype).loss_fn(), t, method="eigh", dtype=dtype, vectors=True)
             for t in thetas]
    plain, _ = hs.spectra_at_many(_loss_for(prob, []), thetas, method="eigh", dtype=dtype)
    for theta, a, b, p in zip(thetas, got, alone, plain):
        f = prob.loss_fn()
        H, g = _oracle(f, theta).numpy(), torch.func.grad(f)(theta).numpy()
        scale = np.abs(a.eigenvalues).max()
        for r in (a, b):
            c, lam = r.grad_coeffs, r.eigenvalues
            assert c.shape == lam.shape == r.v_min.shape == (model.n_params,) and c.dtype == np.float64
            assert np.sum(c ** 2) == pytest.approx(g @ g, rel=rtol)
            assert np.sum(lam * c ** 2) == pytest.approx(g @ H @ g, rel=rtol, abs=rtol * scale * (g @ g))
            assert np.sum(lam ** 2 * c ** 2) == pytest.approx(np.sum((H @ g) ** 2), rel=rtol)
            v = r.v_min
            assert np.linalg.norm(H @ v - lam[0] * v) <= rtol * scale and np.linalg.norm(v) == pytest.approx(1, rel=rtol)
            np.testing.assert_allclose(lam, p.eigenvalues, rtol=0, atol=rtol * scale)
            assert (r.n_pos, r.n_neg, r.n_zero) == (p.n_pos, p.n_neg, p.n_zero)
        assert p.grad_coeffs is None and p.v_min is None  # eigvalsh alone unless asked


def test_a_pass_with_vectors_plans_for_one_points_eigenvectors():
    """eigh with vectors goes one point at a time: a pass holds its Hessians plus one point's V and LAPACK's
    2N² workspace (B + 3 Hessians' worth, not 2B), and auto falls to inertia where 4×H does not fit."""
    n, h_mib, cpu = 3_000, 3_000 ** 2 * 8 / 2**20, torch.device("cpu")
    for budget in (400, 1_000, 4_000):
        per = hs.points_per_pass(n, 8, cpu, budget, "eigh", vectors=True)
        held = (per + hs.footprint("eigh", "cpu", vectors=True) - 1) * h_mib
        assert held + hs.pass_workspace_mb(cpu, budget) <= budget
        assert per == int((0.75 * budget - 3 * h_mib) // h_mib) or per == 1
    assert hs.resolve_method("auto", n, "cpu", memory_budget_mb=190) == "eigh"  # 2×H = 137 MiB ≤ ¾·190
    assert hs.resolve_method("auto", n, "cpu", memory_budget_mb=190, vectors=True) == "inertia"  # 4×H does not
    assert hs.resolve_method("auto", n, "cpu", memory_budget_mb=380, vectors=True) == "eigh"
    # cuSOLVER's syevd asks for 4×H of workspace (measured on an H100), so one CUDA point holds 6×H
    assert hs.resolve_method("auto", n, "cuda", memory_budget_mb=380, vectors=True) == "inertia"
    assert hs.resolve_method("auto", n, "cuda", memory_budget_mb=560, vectors=True) == "eigh"
    per = hs.points_per_pass(n, 8, torch.device("cuda"), 4_000, "eigh", vectors=True)
    assert per == int((0.75 * 4_000 - 5 * h_mib) // h_mib)


@pytest.mark.parametrize("oom_first,what,where", [(1, "one point at a time after", "cuda"),
                                                  (2, "1/16 workspace", "cuda"), (3, "moved to CPU", "cuda"),
                                                  (1, "one point at a time after", "cpu")])
def test_spectra_at_many_falls_back_after_out_of_memory(oom_first, what, where):
    model, n, loss, wd = CASES[1]
    prob = _problem(model, n, loss, wd)
    thetas = torch.stack([model.init(s) for s in range(3)])
    calls = []
    got, fallback = hs.spectra_at_many(_loss_for(prob, calls, oom_first, where), thetas, method="auto",
                                       chunk_size=8)
    assert what in fallback and len(calls) == oom_first + 1
    ref = [hs.spectrum_at(prob.loss_fn(), t) for t in thetas]
    assert [(r.n_pos, r.n_neg, r.n_zero) for r in got] == [(r.n_pos, r.n_neg, r.n_zero) for r in ref]


def test_the_small_workspace_fallback_keeps_an_automatic_chunk(monkeypatch):
    """chunk_size=0 (automatic, the config's default) stays automatic within 1/16 of the workspace; it
    once became 1, one column per vmapped call."""
    model, n, loss, wd = CASES[0]
    prob = _problem(model, n, loss, wd)
    used, fill = [], hessian_build._fill
    monkeypatch.setattr(hessian_build, "_fill", lambda H, rows_for, weight, first, chunk:
                        used.append(chunk) or fill(H, rows_for, weight, first, chunk))
    thetas = torch.stack([model.init(s) for s in range(2)])
    _, fallback = hs.spectra_at_many(_loss_for(prob, [], 2), thetas, method="eigh", hvp="rev", chunk_size=0)
    assert "1/16 workspace" in fallback and used and min(used) > 1, used


def test_spectra_at_many_gives_up_loudly_and_passes_other_errors_through():
    model, n, loss, wd = CASES[1]
    prob = _problem(model, n, loss, wd)
    thetas = torch.stack([model.init(0)])
    with pytest.raises(MemoryError, match=f"{model.n_params} parameters"):
        hs.spectra_at_many(_loss_for(prob, [], oom_first=99), thetas)

    def broken(device, dtype):
        raise ValueError("bad data")
    with pytest.raises(ValueError, match="bad data"):
        hs.spectra_at_many(broken, thetas)


def test_bad_arguments_name_the_bad_value():
    with pytest.raises(ValueError, match="'lu'"):
        hs.spectrum_at(_saddle_loss, torch.zeros(2, dtype=F64), method="lu")
    with pytest.raises(ValueError, match="'sideways'"):
        hs.hessian(_saddle_loss, torch.zeros(2, dtype=F64), hvp="sideways")
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        hs.hessian(_saddle_loss, torch.zeros(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="gap"):
        hs.spectrum_at(_saddle_loss, torch.zeros(2, dtype=F64), method="estimate", tol_mode="gap")
    for method in ("eigh", "inertia"):  # once: eigh took tol 0 and inertia a relative one
        with pytest.raises(ValueError, match="tol_mode='abs' needs tol"):
            hs.spectrum_at(_saddle_loss, torch.zeros(2, dtype=F64), method=method, tol_mode="abs")
        with pytest.raises(ValueError, match="'relative'"):
            hs.spectrum_at(_saddle_loss, torch.zeros(2, dtype=F64), method=method, tol_mode="relative")
    assert hs.spectrum_at(_saddle_loss, torch.zeros(2, dtype=F64), tol_mode="abs", tol=0.5).tol == 0.5


def test_non_finite_points_are_named_before_any_eigensolver_sees_them():
    """NaN or inf parameters, a Hessian with NaN (finite parameters), an infinite loss, a NaN tol: a
    ValueError that says which, not an eigensolver's "failed to converge" or an ``ok`` point."""
    model, n, loss, wd = CASES[0]
    prob = _problem(model, n, loss, wd)
    thetas = torch.stack([model.init(s) for s in range(3)])
    thetas[1, 0] = float("inf")
    for method in ("eigh", "inertia"):
        with pytest.raises(ValueError, match=r"NaN or inf in the parameters of point\(s\) \[1\]"):
            hs.spectra_at_many(_loss_for(prob, []), thetas, method=method)
    cone = lambda t: torch.linalg.vector_norm(t)  # noqa: E731 — finite at 0, its Hessian is not
    with pytest.raises(ValueError, match="NaN or inf in the Hessian$"):
        hs.spectrum_at(cone, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"NaN or inf in the Hessian of point\(s\) \[0, 1\]"):
        hs.spectra_at_many(lambda dev, dt: cone, torch.zeros(2, 3, dtype=F64), batch_points=True)
    with pytest.raises(ValueError, match=r"NaN or inf in the Hessian of point\(s\) \[0\]"):  # one per pass
        hs.spectra_at_many(lambda dev, dt: cone, torch.zeros(2, 3, dtype=F64), method="eigh", memory_budget_mb=1e-4)
    with pytest.raises(ValueError, match="NaN or inf in the Hessian-vector product"):
        hs.spectrum_at(cone, torch.zeros(3, dtype=F64), method="estimate", tol=0.1)
    assert hs.spectra_at_many(lambda dev, dt: cone, torch.zeros(0, 3, dtype=F64)) == ([], None)
    with pytest.raises(ValueError, match="the loss is inf"):
        hs.spectrum_at(lambda t: (t ** 2).sum() + float("inf"), torch.ones(3, dtype=F64), method="inertia")
    with pytest.raises(ValueError, match="tol must be ≥ 0, got nan"):
        hs.spectrum_at(_saddle_loss, torch.zeros(2, dtype=F64), method="eigh", tol=float("nan"))


def test_symmetrize_in_blocks_equals_the_dense_formula():
    g = torch.Generator().manual_seed(6)
    A = torch.randn(2, 1100, 1100, generator=g, dtype=F64)  # 1100 = two 512 blocks and a ragged one
    want = (A + A.transpose(-1, -2)) / 2
    assert torch.equal(hs.symmetrize_(A.clone()), want)


def test_default_chunk_follows_the_workspace():
    cpu = torch.device("cpu")
    assert hs.default_chunk_size(1000, cpu, column_bytes=2**20) == 16  # 16 MiB on one thread (fixture)
    assert hs.default_chunk_size(1000, cpu, column_bytes=2**20, n_points=4) == 4
    assert hs.default_chunk_size(10, cpu, column_bytes=1) == 10  # never more than N
    assert hs.default_chunk_size(1000, cpu, column_bytes=2**30) == 1  # never fewer than 1
    assert hs.default_chunk_size(1000, cpu, column_bytes=2**20, workspace_bytes=100 * 2**20) == 100
    torch.set_num_threads(2)
    try:
        assert hs.default_chunk_size(1000, cpu, column_bytes=2**20) == 64  # 16 MiB × 2²
    finally:
        torch.set_num_threads(1)


# ---------------------------------------------------------------- GPU: run by scripts/gpu_checks.sh

def _gpu_case():
    model = MLP(16, 4, depth=2, width=24, activation="tanh")  # N = 1,108
    return model, _problem(model, 256, "mse", 1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["eigh", "inertia"])
@pytest.mark.parametrize("hvp", ["rev", "fwd"])
def test_cuda_spectrum_equals_cpu(method, hvp):
    model, prob = _gpu_case()
    theta = model.init(7)
    # tol_mode="rel": a gap tolerance would sit next to rounding-noise eigenvalues, which differ by device
    cpu = hs.spectrum_at(prob.loss_fn(), theta, method="eigh", tol_mode="rel")
    gpu = hs.spectrum_at(prob.to("cuda", F64).loss_fn(), theta, method=method, device="cuda", hvp=hvp,
                         tol_mode="rel", tol=None if method == "eigh" else cpu.tol)
    assert gpu.device.startswith("cuda") and gpu.method == method
    assert (gpu.n_pos, gpu.n_neg, gpu.n_zero) == (cpu.n_pos, cpu.n_neg, cpu.n_zero)
    if method == "eigh":
        scale = np.abs(cpu.eigenvalues).max()
        np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=0, atol=1e-9 * scale)
        assert gpu.tol == pytest.approx(cpu.tol, rel=1e-6)
    H_gpu = hs.hessian(prob.to("cuda", F64).loss_fn(), theta.cuda(), hvp=hvp).cpu()
    _close(H_gpu, hs.hessian(prob.loss_fn(), theta), tol=1e-12)


@pytest.mark.gpu
@cuda
def test_cuda_batched_path_equals_cpu():
    model, prob = _gpu_case()
    thetas = torch.stack([model.init(s) for s in range(6)])
    calls = []
    gpu, fallback = hs.spectra_at_many(_loss_for(prob, calls), thetas, device="cuda", method="eigh", tol_mode="rel")
    assert fallback is None
    cpu = [hs.spectrum_at(prob.batched_loss_terms(prob.data.n // 2), t, method="eigh", tol_mode="rel")
           for t in thetas]
    for a, b in zip(gpu, cpu):
        assert (a.n_pos, a.n_neg, a.n_zero) == (b.n_pos, b.n_neg, b.n_zero)
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=1e-9 * np.abs(b.eigenvalues).max())
    counts, _ = hs.spectra_at_many(_loss_for(prob, calls), thetas, device="cuda", method="inertia")
    assert [(c.n_pos, c.n_neg, c.n_zero) for c in counts] == [(b.n_pos, b.n_neg, b.n_zero) for b in cpu]
    H = hs.hessians(prob.to("cuda", F64).loss_fn(), thetas.cuda())
    for k in range(6):
        _close(H[k].cpu(), hs.hessian(prob.loss_fn(), thetas[k]), tol=1e-12)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-9), (torch.float32, 1e-4)])
def test_cuda_batched_eigensolver_equals_torch_and_the_cpu(dtype, rtol, monkeypatch):
    """A CUDA pass takes its spectra from cuSOLVER's batched solver (pipeline.numerics.cusolver), eigenvectors too:
    the same eigenvalues and counts as torch's own calls (MINRATIO_BATCHED_EIGH=torch) and the CPU, and Vᵀg
    and v_min that hold against the float64 autograd Hessian (Σc² = ‖g‖², Σλc² = gᵀHg, Hv = λv)."""
    from pipeline.numerics import cusolver

    model, prob = _gpu_case()
    thetas = torch.stack([model.init(s) for s in range(4)])
    assert cusolver.library() is not None  # the CUDA machines here ship cuSOLVER ≥ 11.7.1
    kw = dict(device="cuda", method="eigh", dtype=dtype, tol_mode="rel")
    for vectors in (False, True):
        got, _ = hs.spectra_at_many(_loss_for(prob, []), thetas, vectors=vectors, **kw)
        monkeypatch.setenv("MINRATIO_BATCHED_EIGH", "torch")
        ref, _ = hs.spectra_at_many(_loss_for(prob, []), thetas, vectors=vectors, **kw)
        monkeypatch.delenv("MINRATIO_BATCHED_EIGH")
        for theta, a, b in zip(thetas, got, ref):
            scale = np.abs(b.eigenvalues).max()
            np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=rtol * scale)
            if dtype == F64:
                assert (a.n_pos, a.n_neg, a.n_zero) == (b.n_pos, b.n_neg, b.n_zero)
            if not vectors:
                assert a.grad_coeffs is None
                continue
            f = prob.loss_fn()
            H, g = _oracle(f, theta).numpy(), torch.func.grad(f)(theta).numpy()
            c, lam, v = a.grad_coeffs, a.eigenvalues, a.v_min
            assert np.sum(c ** 2) == pytest.approx(g @ g, rel=rtol * 10)
            assert np.sum(lam * c ** 2) == pytest.approx(g @ H @ g, rel=rtol * 10, abs=rtol * scale * (g @ g))
            assert np.linalg.norm(H @ v - lam[0] * v) <= rtol * 10 * scale


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_cuda_inplace_eigvalsh_holds_one_hessian_and_equals_eigvalsh(dtype, rtol):
    """cusolver.eigvalsh_inplace_ (sytrd in H's memory, dsterf on the host): torch's eigenvalues of a
    planted spectrum with near-zero eigenvalues, in H and sytrd's workspace (torch's eigvalsh: 6×H); a pass whose
    budget cannot hold eigvalsh's copy and workspace takes it, with the CPU's counts."""
    from pipeline.numerics import cusolver

    n = 1500
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.cat([torch.linspace(-1, 1, n - 200, dtype=F64), 1e-9 * torch.randn(200, generator=g, dtype=F64)])
    A = ((Q * lam) @ Q.T).to("cuda", dtype)
    A = (A + A.T) / 2
    ref = torch.linalg.eigvalsh(A.double()).cpu()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = cusolver.eigvalsh_inplace_(A)
    extra = torch.cuda.max_memory_allocated() - base
    assert got.dtype == F64 and got.shape == (n,)
    assert float((got - ref).abs().max()) <= rtol * float(ref.abs().max())
    ws = cusolver.sytrd_workspace_bytes(A)
    assert extra <= ws + 2**20, (extra, ws)  # its workspace (a panel: 0.07×H at N = 29k) and nothing else
    assert ws < cusolver.workspace_bytes(A) + n * n * dtype.itemsize  # less than eigvalsh's copy + syevd's
    B = ((Q * lam) @ Q.T).to("cuda", dtype)
    assert cusolver.eigvalsh_needs_inplace(B, max_bytes=2 * n * n * dtype.itemsize)
    assert not cusolver.eigvalsh_needs_inplace(B)
    lams, _, _ = hs._eigen(B[None], None, max_bytes=2 * n * n * dtype.itemsize)
    np.testing.assert_allclose(lams[0], ref.numpy(), rtol=0, atol=rtol * float(ref.abs().max()))
    assert not cusolver.eigvalsh_needs_inplace(B.T, max_bytes=1)  # not contiguous: torch's path
    assert cusolver.eigvalsh_inplace_(torch.full((1, 1), 3.0, dtype=dtype, device="cuda")).tolist() == [3.0]
    model, prob = _gpu_case()
    thetas = torch.stack([model.init(s) for s in range(3)])
    h_mb = model.n_params ** 2 * 8 / 2**20
    cpu, _ = hs.spectra_at_many(_loss_for(prob, [], where="cpu"), thetas, method="eigh", device="cpu")
    lean, _ = hs.spectra_at_many(_loss_for(prob, []), thetas, method="eigh", device="cuda",
                                 memory_budget_mb=4 * h_mb / hs.HESSIAN_SHARE)  # 1 point a pass, room 3×H
    for a, b in zip(lean, cpu):
        assert (a.n_pos, a.n_neg, a.n_zero) == (b.n_pos, b.n_neg, b.n_zero)
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=1e-9 * np.abs(b.eigenvalues).max())


@pytest.mark.gpu
@cuda
def test_a_cpu_spectrum_leaves_cuda_alone_and_the_switch_turns_the_inplace_path_off():
    """A CPU eigh never asks for cuSOLVER (which would set up CUDA on GPU 0); MINRATIO_BATCHED_EIGH=torch
    keeps torch's eigvalsh even where the in-place path would be taken."""
    code = ("import torch; from pipeline.curvature import hessian as hs\n"
            "H = torch.diag(torch.arange(1., 51., dtype=torch.float64))\n"
            "print(hs.count_dense(H, method='eigh')[0].counts.n_pos, torch.cuda.is_initialized())\n"
            "import os; os.environ['MINRATIO_BATCHED_EIGH'] = 'torch'\n"
            "from pipeline.numerics import cusolver\n"
            "print(cusolver.eigvalsh_needs_inplace(H.cuda(), max_bytes=1))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["50", "False", "False"], out


@pytest.mark.gpu
@cuda
def test_cuda_peak_memory_is_the_hessian_plus_its_counting_footprint():
    """Counts (LDLᵀ in H's own memory): at most H plus Bunch–Kaufman's saved lower triangle, 1.53×H (the
    blocked LDLᵀ, auto's choice on CUDA, keeps no copy: 1.12-1.18×H on an H100). Full spectrum:
    cuSOLVER's eigvalsh workspace comes on top — measured 6.0×H on an H200 (torch 2.11, N = 2k–29k) —
    so eigh is held to what was measured, not to 2×."""
    model = MLP(16, 4, depth=2, width=60, activation="tanh")  # N = 4,984: H is 199 MB
    prob = _problem(model, 256, "mse", 0.0).to("cuda", F64)
    theta = model.init(8).cuda()
    n = model.n_params
    budget_mb = 64
    for method in ("eigh", "inertia"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hs.spectrum_at(prob.loss_fn(), theta, method=method, memory_budget_mb=budget_mb)
        peak = torch.cuda.max_memory_allocated() - base
        factor = hs.footprint(method, "cuda") + 0.2 if method == "eigh" else hs.footprint("inertia", "cuda") + 0.1
        assert peak <= factor * n * n * 8 + 3 * budget_mb * 2**20, (method, peak / (n * n * 8))


def test_spectrum_at_estimate_intervals_contain_the_exact_counts():
    """method="estimate" never forms H; its intervals hold the exact counts and the label is honest."""
    torch.manual_seed(0)
    model = MLP(6, 2, depth=1, width=24, activation="tanh")
    X, Y = torch.randn(120, 6, dtype=F64), torch.randn(120, 2, dtype=F64)
    f = _problem_xy(model, X, Y).loss_fn()
    theta = model.init(3)
    exact = hs.spectrum_at(f, theta, method="eigh", tol_mode="rel", rel_tol=1e-2)
    est = hs.spectrum_at(f, theta, method="estimate", tol=exact.tol, estimate={"n_probes": 20, "seed": 1})
    assert est.eigenvalues is None and est.method == "estimate"
    for name in ("n_pos", "n_neg", "n_zero"):
        lo, hi = est.estimate[f"{name}_ci"]
        assert lo <= getattr(exact, name) <= hi, (name, lo, getattr(exact, name), hi)
    lo, hi = est.estimate["min_ratio_ci"]
    assert lo <= exact.min_ratio <= hi
    assert est.label in (exact.label, "uncertain")
    assert np.isnan(est.min_ratio_naive)  # tol = 0 cannot be estimated: not reported rather than guessed
    with pytest.raises(ValueError, match="resolution"):
        hs.spectrum_at(f, theta, method="estimate", tol=1e-12 * exact.lam_max, estimate={"degree": 50})


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_spectra_at_many_estimates_in_the_dtype_asked_for(dtype):
    """The estimator in a pipeline pass takes the pass's dtype (float32 once failed: float64 parameters
    against float32 data)."""
    torch.manual_seed(0)
    model = MLP(6, 2, depth=1, width=24, activation="tanh")
    prob = _problem_xy(model, torch.randn(120, 6, dtype=F64), torch.randn(120, 2, dtype=F64))
    thetas = torch.stack([model.init(s) for s in range(2)])
    got, fallback = hs.spectra_at_many(lambda dev, dt: prob.to(dev, dt).loss_fn(), thetas, method="estimate",
                                       dtype=dtype, tol_mode="rel", rel_tol=0.3, estimate={"degree": 0})
    assert fallback is None and [r.dtype for r in got] == [dtype, dtype]
    for r, theta in zip(got, thetas):
        exact = hs.spectrum_at(prob.loss_fn(), theta, method="eigh", tol=r.tol)
        for name in ("n_pos", "n_neg", "n_zero"):
            lo, hi = r.estimate[f"{name}_ci"]
            assert lo <= getattr(exact, name) <= hi, (name, lo, getattr(exact, name), hi)


def _problem_xy(model, X, Y):
    return Problem(model, Dataset(X, Y, 0), "mse", 0.0)


def test_auto_takes_the_estimator_only_when_the_dense_hessian_does_not_fit():
    assert hs.resolve_method("auto", 1_000, "cpu") == "eigh"
    assert hs.resolve_method("auto", 5_000, "cpu") == "inertia"
    # 2·N²·8 bytes at N = 10⁶ is 16 TB: no dense Hessian, counts from HVPs.
    assert hs.resolve_method("auto", 1_000_000, "cpu") == "estimate"
    # …and a budget decides it for smaller N too, through the 3/4 of it a pass gives its Hessians (the
    # rest is build workspace): H is 72 MB; inertia holds 1.53×H = 105 MiB > ¾·100 MiB.
    assert hs.resolve_method("auto", 3_000, "cpu", memory_budget_mb=100) == "estimate"
    # eigh's 2×H (137 MiB) does not fit ¾·160 MiB, inertia's 105 MiB does; ¾·190 MiB holds eigh
    assert hs.resolve_method("auto", 3_000, "cpu", memory_budget_mb=160) == "inertia"
    assert hs.resolve_method("auto", 3_000, "cpu", memory_budget_mb=190) == "eigh"
    for budget in (160, 190):  # and the pass it plans fits the budget: one point, its counting, workspace
        method = hs.resolve_method("auto", 3_000, "cpu", memory_budget_mb=budget)
        per = hs.points_per_pass(3_000, 8, torch.device("cpu"), budget, method)
        held = (per + hs.footprint(method) - 1) * 3_000 ** 2 * 8 / 2**20
        assert per == 1 and held + hs.pass_workspace_mb(torch.device("cpu"), budget) <= budget
    assert hs.resolve_method("eigh", 1_000_000, "cpu") == "eigh"
