"""Inertia from LDLᵀ (Bunch–Kaufman) against eigvalsh: planted eigenvalues at ±tol·(1 ± 1e-3), exact zeros,
matrices that force 2×2 pivots; Lanczos extremes against eigvalsh; CUDA (cuSOLVER) against CPU (LAPACK)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import peak_rss_growth_mib
from pipeline.curvature import inertia, spectrum

F64 = torch.float64
TOL = 1e-6
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


def _rotate(lam: torch.Tensor, seed: int) -> torch.Tensor:
    """Q diag(lam) Qᵀ for a random orthogonal Q, symmetrised."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=F64))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def _planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with eigenvalues just inside and just outside ±TOL, zeros, and an O(1) bulk of both signs."""
    g = torch.Generator().manual_seed(1000 + seed)
    edge = torch.tensor([1 + 1e-3, 1 - 1e-3, -(1 + 1e-3), -(1 - 1e-3)], dtype=F64) * TOL
    bulk = torch.randn(n - 4 - n // 5, generator=g, dtype=F64)
    lam = torch.cat([edge.repeat(1), torch.zeros(n // 5, dtype=F64), bulk])
    return _rotate(lam, seed), lam


def _zero_diagonal(n: int, seed: int) -> torch.Tensor:
    """[[0, B], [Bᵀ, 0]] (eigenvalues ±σ(B)) with its diagonal zero: every pivot Bunch–Kaufman can
    take is a 2×2 block. Rows interleaved so the blocks are not all in one corner."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n // 2, n - n // 2, generator=g, dtype=F64)
    A = torch.zeros(n, n, dtype=F64)
    A[: n // 2, n // 2:] = B
    A[n // 2:, : n // 2] = B.T
    perm = torch.randperm(n, generator=g)
    return A[perm][:, perm]


def _truth(A: torch.Tensor, tol: float) -> spectrum.Counts:
    return spectrum.count(np.linalg.eigvalsh(A.numpy()), tol)


def _tolerant(c: spectrum.Counts) -> tuple[int, int, int]:
    """The counts with a tolerance. ``n_pos_naive`` (#{λ > 0}) is left out where a matrix has zero
    eigenvalues: their sign is rounding noise, different for eigh and LDLᵀ — the science's point."""
    return c.n_pos, c.n_neg, c.n_zero


@pytest.mark.parametrize("n,seed", [(20, 0), (60, 1), (150, 2), (300, 3)])
def test_counts_match_eigvalsh_at_planted_eigenvalues_around_tol(n, seed):
    A, lam = _planted(n, seed)
    got = inertia.counts(A.clone(), TOL)
    assert _tolerant(got) == _tolerant(spectrum.count(lam.numpy(), TOL)) == _tolerant(_truth(A, TOL))
    assert (got.n_pos, got.n_neg) == (int((lam > TOL).sum()), int((lam < -TOL).sum()))
    nonzero = A + 2 * TOL * torch.eye(n, dtype=F64)  # no eigenvalue within 1e-9 of 0: naive count is exact
    assert inertia.counts(nonzero.clone(), 0.0) == _truth(nonzero, 0.0)


@pytest.mark.parametrize("n,seed", [(2, 0), (7, 1), (40, 2), (121, 3)])
def test_zero_diagonal_forces_two_by_two_pivots_and_counts_still_agree(n, seed):
    A = _zero_diagonal(n, seed)
    pivots = torch.linalg.ldl_factor_ex(A)[1]
    assert (pivots < 0).sum() >= 2  # the 2×2 branch really runs
    assert _tolerant(inertia.counts(A.clone(), 1e-9)) == _tolerant(_truth(A, 1e-9))
    if n % 2 == 0:  # square B: no zero eigenvalue, so the naive count is exact too
        assert inertia.counts(A.clone(), 0.0) == _truth(A, 0.0)
    # indefinite and shifted: runs of 2×2 blocks between 1×1 pivots
    B = A + torch.diag(torch.linspace(-0.5, 0.5, n, dtype=F64))
    assert _tolerant(inertia.counts(B.clone(), 1e-3)) == _tolerant(_truth(B, 1e-3))


def test_exactly_singular_matrices_count_their_zeros():
    # ldl_factor (not _ex) raises on an exact zero pivot; zero eigenvalues are the point here.
    Z = torch.zeros(5, 5, dtype=F64)
    assert inertia.inertia(Z).tolist() == [0, 0, 5]
    D = torch.diag(torch.tensor([3.0, 0.0, -1.0, 0.0, 2.0], dtype=F64))
    assert inertia.inertia(D).tolist() == [2, 1, 2]
    swap = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    assert inertia.inertia(swap).tolist() == [1, 1, 1]
    rank_one = torch.full((4, 4), 2.0, dtype=F64)  # eigenvalues 8, 0, 0, 0 — exact in LDLᵀ
    assert inertia.counts(rank_one, 0.0) == spectrum.Counts(1, 0, 3, 1)


def test_position_in_run():
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 0, 1], dtype=torch.bool)
    got = inertia._position_in_run(mask)
    assert got[mask].tolist() == [0, 1, 0, 1, 2, 3, 0]


def test_batched_inertia_equals_one_by_one():
    mats = torch.stack([_planted(40, 5)[0], _zero_diagonal(40, 6), -_planted(40, 7)[0]])
    got = inertia.inertia(mats)
    assert got.shape == (3, 3)
    for k in range(3):
        assert got[k].tolist() == inertia.inertia(mats[k]).tolist()


def test_counts_leave_the_matrix_as_it_was_bit_for_bit():
    """The factorisations overwrite H; counts put it back exactly (ragged last block: N = 50 = 16·3 + 2)."""
    A, _ = _planted(50, 8)
    assert torch.equal(A, A.T)
    before = A.clone()
    for naive in (True, False):
        inertia.counts(A, 0.25, naive=naive)
        assert torch.equal(A, before)
    inertia.counts(A, 0.0)
    assert torch.equal(A, before)


def test_counts_read_the_lower_triangle_in_place_and_on_a_strided_view():
    """Like LAPACK, counts read the lower triangle: garbage above the diagonal changes nothing, and H
    comes back as its lower triangle mirrored. Column-major H is factored in place as it is, a strided
    view as a copy; both give the same counts and leave the memory around them alone."""
    A, _ = _planted(70, 15)
    junk = A.tril() + torch.randn(70, 70, dtype=F64, generator=torch.Generator().manual_seed(1)).triu(1)
    ref = inertia.counts(A.clone(), TOL)
    assert ref == inertia.counts(junk, TOL)
    assert torch.equal(junk, A.tril() + A.tril(-1).T)
    column_major = A.clone().T  # symmetric, so the same matrix: factored in place as it is
    assert not column_major.is_contiguous()
    assert inertia.counts(column_major, TOL) == ref and torch.equal(column_major, A)
    holder = torch.zeros(140, 140, dtype=F64)
    holder[::2, ::2] = A
    neither = holder[::2, ::2]  # neither row- nor column-major: factored as a copy
    assert inertia.counts(neither, TOL) == ref and torch.equal(neither, A)
    assert holder[1::2].abs().max() == 0 and holder[:, 1::2].abs().max() == 0


def test_counts_factor_in_the_matrix_own_memory():
    """Peak resident memory of counts on a 2,000² Hessian (32 MB) in a fresh process: the saved lower
    triangle (17/32 of H) and no N×N copy — torch's ldl_factor copies its input unless it is told to
    write into the input's column-major view."""
    n = 2000
    # Built without N×N temporaries: a setup that peaks higher than counts would hide what counts take
    # (the peak is a high-water mark) — measured this way the copying inertia() takes +1.03×H.
    setup = (
        "from pipeline.curvature import inertia\n"
        "from pipeline.numerics.symmetric import symmetrize_\n"
        f"A = symmetrize_(torch.randn({n}, {n}, dtype=torch.float64))\n"
        "inertia.counts(A[:64, :64].clone(), 1e-3)\n"  # load LAPACK's code before measuring
    )
    extra = peak_rss_growth_mib(setup, "inertia.counts(A, 1e-3)") * 2**20 / (n * n * 8)
    assert extra < inertia.SAVED_SHARE + 0.1, extra


@pytest.mark.parametrize("tol", [0.0, TOL, 0.25])
def test_counts_without_the_naive_factorisation_agree(tol):
    """naive=False drops only #{λ > 0} (at tol = 0 it is the one factorisation there is)."""
    for A in (_planted(120, 30)[0], _zero_diagonal(121, 31)):
        ref = inertia.counts(A.clone(), tol)
        lean = inertia.counts(A.clone(), tol, naive=False)
        assert _tolerant(lean) == _tolerant(ref)
        if tol > 0:  # at tol = 0 the exact zeros' signs are rounding noise, different in eigh and LDLᵀ
            assert _tolerant(ref) == _tolerant(_truth(A, tol))
        assert lean.n_pos_naive is None if tol > 0 else lean.n_pos_naive == ref.n_pos_naive


def test_counts_reject_a_negative_or_nan_tolerance():
    A, _ = _planted(10, 9)
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="tol must be"):
            inertia.counts(A, bad)


@pytest.mark.parametrize("n", [3, 60, 400])
def test_lanczos_extremes_match_eigvalsh(n):
    g = torch.Generator().manual_seed(n)
    lam = torch.cat([torch.tensor([-3.0, 5.0], dtype=F64), torch.rand(n - 2, generator=g, dtype=F64) * 2 - 1])
    A = _rotate(lam, n)
    lo, hi = inertia.extreme_eigenvalues(A)
    assert abs(lo + 3.0) <= 1e-9 * 5 and abs(hi - 5.0) <= 1e-9 * 5


def test_lanczos_on_low_rank_and_zero_matrices_stops_on_an_invariant_subspace():
    lam = torch.zeros(200, dtype=F64)
    lam[:3] = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    lo, hi = inertia.extreme_eigenvalues(_rotate(lam, 11))
    assert lo == pytest.approx(-1.0, abs=1e-12) and hi == pytest.approx(2.0, abs=1e-12)
    assert inertia.extreme_eigenvalues(torch.zeros(30, 30, dtype=F64)) == (0.0, 0.0)


def test_batched_lanczos_equals_one_by_one_when_members_finish_at_different_steps():
    low_rank = torch.zeros(120, dtype=F64)
    low_rank[:2] = torch.tensor([1.5, -0.25], dtype=F64)  # invariant subspace after 2 steps
    mats = torch.stack([_rotate(low_rank, 21), _planted(120, 22)[0], torch.zeros(120, 120, dtype=F64)])
    got = inertia.extreme_eigenvalues_batch(mats, together=True)  # as on a GPU
    assert inertia.extreme_eigenvalues_batch(mats) == [inertia.extreme_eigenvalues(M) for M in mats]  # CPU
    assert got[2] == (0.0, 0.0)
    for k in range(3):
        ref = np.linalg.eigvalsh(mats[k].numpy())
        scale = max(abs(ref).max(), 1e-300)
        assert abs(got[k][0] - ref[0]) <= 1e-9 * scale and abs(got[k][1] - ref[-1]) <= 1e-9 * scale
        assert got[k] == pytest.approx(inertia.extreme_eigenvalues(mats[k]), abs=1e-10 * scale)


@pytest.mark.gpu
@cuda
def test_cuda_inertia_equals_cpu_including_two_by_two_pivots():
    """cuSOLVER's sytrf must report pivots in LAPACK's format, or the 2×2 blocks are miscounted."""
    cases = [_planted(300, 12)[0], _zero_diagonal(301, 13), _zero_diagonal(64, 14) + 0.01 * torch.eye(64, dtype=F64)]
    for A in cases:
        gpu_piv = torch.linalg.ldl_factor_ex(A.cuda())[1]
        assert (gpu_piv < 0).any() or A.diagonal().abs().min() > 0
        for factor in ("bunch_kaufman", "blocked"):  # blocked: auto's choice on CUDA
            for tol in (1e-9, TOL, 1e-2):
                assert _tolerant(inertia.counts(A.cuda(), tol, factor=factor)) \
                    == _tolerant(inertia.counts(A.clone(), tol)) == _tolerant(_truth(A, tol))
            shifted = A + 1e-3 * torch.eye(A.shape[0], dtype=F64)  # no eigenvalue near 0: naive count exact
            assert inertia.counts(shifted.cuda(), 0.0, factor=factor) == inertia.counts(shifted.clone(), 0.0) \
                == _truth(shifted, 0.0)
            assert inertia.counts(A.cuda(), 1e-2, naive=False, factor=factor) \
                == inertia.counts(A.clone(), 1e-2, naive=False)
    batch = torch.stack(cases[1:2] * 3)
    assert inertia.inertia(batch.cuda()).cpu().tolist() == inertia.inertia(batch).tolist()
    pair = torch.stack([cases[0], -2 * cases[0]])
    got, ref = inertia.extreme_eigenvalues_batch(pair.cuda()), inertia.extreme_eigenvalues_batch(pair)
    assert np.allclose(np.array(got), np.array(ref), rtol=0, atol=1e-9 * float(pair.abs().max()))
    lo, hi = inertia.extreme_eigenvalues(cases[0].cuda())
    ref = np.linalg.eigvalsh(cases[0].numpy())
    assert abs(lo - ref[0]) <= 1e-9 * abs(ref).max() and abs(hi - ref[-1]) <= 1e-9 * abs(ref).max()


GAP_CASES = [  # name, eigenvalues: a gap of 1e6 below 1e-8·max, none, and zeros that are exact
    ("gap", [-2.0, -1e-3, 0.5, 1.0, 3.0] + [1e-14, -3e-15, 2e-14]),
    ("no_gap", list(np.geomspace(1e-12, 1.0, 8)) + [-0.2, 0.7]),
    ("exact_zeros", [0.0, 0.0, 0.0, -1.0, 2.0, 5e-5, 1.0]),
]


@pytest.mark.parametrize("name, eigs", GAP_CASES, ids=[c[0] for c in GAP_CASES])
def test_gap_rule_by_inertia_counts_matches_eigh(name, eigs):
    from pipeline.curvature.hessian import count_dense

    gen = torch.Generator().manual_seed(3)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    H = Q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ Q.T
    H = (H + H.T) / 2
    by_eigh, _ = count_dense(H, method="eigh", tol_mode="gap")
    lam = torch.linalg.eigvalsh(H)
    by_inertia, _ = count_dense(H.clone(), method="inertia", tol_mode="gap",
                                extremes=(float(lam[0]), float(lam[-1])))
    assert by_inertia.tol_method == by_eigh.tol_method == ("rel" if name == "no_gap" else "gap")
    c_i, c_e = by_inertia.counts, by_eigh.counts  # (the naive #{λ > 0} of rounding-level zeros is noise)
    assert (c_i.n_pos, c_i.n_neg, c_i.n_zero) == (c_e.n_pos, c_e.n_neg, c_e.n_zero)
    if name == "gap":
        assert by_eigh.counts.n_zero == 3 and 1e-13 < by_inertia.tol < 1e-3


def test_gap_from_zero_counts_finds_the_lowest_plateau():
    from pipeline.curvature import spectrum

    tols = 10.0 ** np.arange(-14, -1, 0.5)
    lam = np.array([1e-15, 2e-13, 1e-6, 1e-1, 0.5, 1.0])  # gaps 5e6 (2e-13 → 1e-6) and 1e5 (1e-6 → 1e-1)
    zeros = np.array([(np.abs(lam) <= t).sum() for t in tols])
    tol = spectrum.gap_from_zero_counts(tols, zeros, top=1.0, n=lam.size, rel_tol=1e-6)
    assert 2e-13 < tol < 1e-6  # the lowest gap, as choose_tol picks it
    assert spectrum.count(lam, tol) == spectrum.count(lam, spectrum.choose_tol(np.abs(lam), mode="gap")[0])
    assert spectrum.gap_from_zero_counts(tols, zeros, top=1.0, n=lam.size, gap_ratio=1e8) is None
