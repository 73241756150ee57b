"""The blocked LDLᵀ (pipeline.numerics.block_ldl) against eigvalsh and Bunch–Kaufman: planted eigenvalues at
±tol·(1 ± 1e-3), network Hessians from the closed form, zero diagonals that need delayed pivots, exact
zeros, the give-up path, and H put back bit for bit; on CUDA (where it is the default) against the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.numerics import block_ldl
from pipeline.curvature import inertia, spectrum
from pipeline.curvature import hessian as hs
from pipeline.curvature.models import MLP
from pipeline.curvature.problem import MeanLoss
from test_inertia import TOL, _planted, _rotate, _tolerant, _truth, _zero_diagonal, cuda

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _blocked(A: torch.Tensor, tol: float, **kw) -> tuple[int, int]:
    """(#{λ > tol}, #{λ < −tol}) from two blocked factorisations of copies of ``A``."""
    lo, hi = A.clone(), A.clone()
    lo.diagonal().sub_(tol)
    hi.diagonal().add_(tol)
    a, b = block_ldl.inertia_(lo, atol=1e-3 * tol, **kw), block_ldl.inertia_(hi, atol=1e-3 * tol, **kw)
    assert a is not None and b is not None
    return a[0], b[1]


def _truth_pair(A: torch.Tensor, tol: float) -> tuple[int, int]:
    return _tolerant(_truth(A, tol))[:2]


@pytest.mark.parametrize("n,seed,block", [(60, 1, 16), (150, 2, 32), (301, 3, 64), (300, 4, 300)])
def test_planted_eigenvalues_around_tol_are_counted_exactly(n, seed, block):
    A, lam = _planted(n, seed)
    assert _blocked(A, TOL, block=block) == _truth_pair(A, TOL) == (int((lam > TOL).sum()), int((lam < -TOL).sum()))


def _net_hessians():
    """Closed-form Hessians of small MLPs: random targets (indefinite, near-zero eigenvalues spread over
    decades), classes (cross-entropy), and a teacher's own outputs (an exact minimum: a huge null space)."""
    for act, width, depth in (("tanh", 12, 2), ("relu", 16, 2), ("softplus", 10, 3)):
        model = MLP(8, 3, depth=depth, width=width, activation=act)
        theta = model.init(width)
        g = torch.Generator().manual_seed(width)
        X = torch.randn(96, 8, generator=g, dtype=F64)
        yield hs.hessian(MeanLoss(model, X, torch.randn(96, 3, generator=g, dtype=F64), "mse"), theta)
        yield hs.hessian(MeanLoss(model, X, torch.randint(0, 3, (96,), generator=g), "cross_entropy"), theta)
        yield hs.hessian(MeanLoss(model, X[:5], model.forward(theta, X[:5]), "mse"), theta)


@pytest.mark.parametrize("factor", ["blocked", "bunch_kaufman"])
def test_network_hessians_agree_with_eigvalsh_and_come_back_bit_for_bit(factor, monkeypatch):
    monkeypatch.setattr(block_ldl, "BLOCK", 48)  # several windows on these small Hessians
    for H in _net_hessians():
        lam = np.linalg.eigvalsh(H.numpy())
        tol = TOL * abs(lam).max()
        before = H.clone()
        got = inertia.counts(H, tol, naive=False, factor=factor)
        assert torch.equal(H, before)
        assert (got.n_pos, got.n_neg) == (int((lam > tol).sum()), int((lam < -tol).sum()))


def _two_halves(n: int, seed: int) -> torch.Tensor:
    """[[0, B], [Bᵀ, 0]] in its natural order (eigenvalues ±σ(B)); ``_zero_diagonal`` interleaves it."""
    half = n // 2
    B = torch.randn(half, n - half, generator=torch.Generator().manual_seed(seed), dtype=F64)
    A = torch.zeros(n, n, dtype=F64)
    A[:half, half:], A[half:, :half] = B, B.T
    return A


def test_zero_diagonal_blocks_are_eliminated_through_delayed_directions():
    """Every early window of [[0, B], [Bᵀ, 0]] is all zeros (λ = 0 with a real coupling), so nothing
    there can be eliminated until the window, carrying those directions, reaches B's other side."""
    A = _two_halves(120, 5)
    assert _blocked(A, 1e-9, block=16) == _truth_pair(A, 1e-9) == (60, 60)
    B = _zero_diagonal(121, 6)
    assert _blocked(B, 1e-9, block=16) == _truth_pair(B, 1e-9)


def test_counts_fall_back_to_bunch_kaufman_where_the_blocked_one_gives_up(monkeypatch):
    A = _two_halves(90, 7)
    stuck = A.clone()
    stuck.diagonal().sub_(1e-6)
    assert block_ldl.inertia_(stuck, atol=1e-9, block=4) is None  # 45 zero rows: more than 4·4 wait
    monkeypatch.setattr(block_ldl, "BLOCK", 4)
    before = A.clone()
    assert _tolerant(inertia.counts(A, 1e-6, factor="blocked")) == _tolerant(_truth(before, 1e-6))
    assert torch.equal(A, before)


def test_a_batch_is_counted_as_one_by_one_and_comes_back_bit_for_bit(monkeypatch):
    """Checkpoints of one network factored together: each its own tolerance, its own delayed directions
    (padded to the batch's most), the same counts as Bunch–Kaufman one at a time."""
    model = MLP(8, 3, depth=2, width=12, activation="tanh")
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(96, 8, generator=g, dtype=F64), torch.randn(96, 3, generator=g, dtype=F64)
    f = MeanLoss(model, X, Y, "mse")
    H = torch.stack([hs.hessian(f, model.init(seed)) for seed in range(5)] + [_planted(model.n_params, 3)[0]])
    tols = [TOL * float(np.abs(np.linalg.eigvalsh(h.numpy())).max()) for h in H]
    before = H.clone()
    for block in (8, 32):
        monkeypatch.setattr(block_ldl, "BATCH_BLOCK", block)
        got = inertia.counts_many(H, tols, naive=False, factor="blocked")
        assert torch.equal(H, before)
        assert got == [inertia.counts(h.clone(), t, naive=False, factor="bunch_kaufman") for h, t in zip(H, tols)]
    # One matrix that makes the batch give up: the batch goes one by one, that one by Bunch–Kaufman.
    stuck = torch.stack([H[0, :90, :90], _two_halves(90, 7), H[1, :90, :90]])
    monkeypatch.setattr(block_ldl, "BATCH_BLOCK", 4)
    monkeypatch.setattr(block_ldl, "BLOCK", 4)
    before = stuck.clone()
    got = inertia.counts_many(stuck, [1e-6] * 3, factor="blocked")
    assert torch.equal(stuck, before)
    assert [_tolerant(c) for c in got] == [_tolerant(_truth(m, 1e-6)) for m in before]
    with pytest.raises(ValueError, match="one tol per matrix, got shape .* and 2 tols"):
        inertia.counts_many(stuck, [1e-6] * 2)


def test_exact_zeros_and_decoupled_rows():
    assert block_ldl.inertia_(torch.zeros(50, 50, dtype=F64), atol=1e-9, block=8) == (0, 0, 50)
    A = _rotate(torch.linspace(-2, 2, 40, dtype=F64), 8)
    Z = torch.zeros(70, 70, dtype=F64)
    idx = torch.randperm(70, generator=torch.Generator().manual_seed(9))[:40]
    Z[idx[:, None], idx] = A  # 30 zero rows and columns between A's
    assert _blocked(Z, 1e-6, block=8) == _truth_pair(Z, 1e-6) == (20, 20)
    # Unshifted, those 30 zeros come out of each window's eigh as ±1e-17 or so: their signs are
    # rounding noise (as for the naive count), and only the ±λ of A are certain.
    pos, neg, zero = block_ldl.inertia_(Z.clone(), atol=1e-9, block=8)
    assert pos >= 20 and neg >= 20 and pos + neg + zero == 70


def test_only_the_lower_triangle_is_read_and_written():
    A, _ = _planted(300, 10)
    A.diagonal().sub_(TOL)
    upper = torch.ones(300, 300, dtype=torch.bool).triu(1)
    M = A.masked_fill(upper, float("nan"))  # a NaN read from the upper triangle would spread
    clean = block_ldl.inertia_(A.clone(), atol=1e-9, block=24)
    assert clean is not None and block_ldl.inertia_(M, atol=1e-9, block=24) == clean
    assert torch.isnan(M[upper]).all() and not torch.isnan(M[~upper]).any()  # upper never written
    Z = torch.zeros(128, 128, dtype=F64)
    Z[40, 40], Z[100, 100], Z[3, 90] = 5.0, -7.0, 99.0  # (3, 90) is in the upper triangle
    assert float(block_ldl.max_abs_lower(Z, 32)) == 7.0


def test_a_decoupled_eigenvalue_below_the_float_range_is_no_nan():
    """1/λ overflows for |λ| < 5.6e-309; a direction with such a λ and no coupling must be eliminated
    without its 0·∞ = NaN reaching the Schur complement (found in review: a wrong naive count)."""
    M = torch.tensor([[1e-310, 0, 0], [0, 1.0, 2.0], [0, 2.0, 1.0]], dtype=F64)
    assert block_ldl.inertia_(M, atol=1e-9, block=1) == (2, 1, 0)
    A = torch.randn(200, 200, generator=torch.Generator().manual_seed(14), dtype=F64)
    A = A + A.T
    A[0, :], A[:, 0] = 0.0, 0.0
    A[0, 0] = 1e-310
    lam = torch.linalg.eigvalsh(A)
    got = inertia.counts(A.clone(), 1e-3, factor="blocked")
    assert (got.n_pos, got.n_neg, got.n_pos_naive) == (int((lam > 1e-3).sum()), int((lam < -1e-3).sum()),
                                                        int((lam > 0).sum()))
    # (LAPACK's sytrf gets this naive count wrong: it scales the pivot's column by 1/1e-310 = ∞.)


def test_lower_update_and_mirror_leave_the_other_triangle_alone():
    g = torch.Generator().manual_seed(11)
    C, R, W = (torch.randn(*s, generator=g, dtype=F64) for s in ((37, 37), (37, 5), (37, 5)))
    got = C.clone()
    block_ldl.sub_lower_(got, R, W, cols=8)
    assert torch.equal(got.triu(1), C.triu(1))
    torch.testing.assert_close(got.tril(), (C - R @ W.T).tril(), rtol=0, atol=1e-13)
    S = C.clone()
    block_ldl.mirror_(S, from_upper=False, rows=8)
    assert torch.equal(S, C.tril() + C.tril(-1).T)
    diag = got.diagonal().clone()
    block_ldl.mirror_(got, from_upper=True, rows=5)
    assert torch.equal(got, C.triu(1) + C.triu(1).T + diag.diag())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="factor must be one of .*'ldl'"):
        inertia.counts(torch.eye(3, dtype=F64), 1e-6, factor="ldl")
    with pytest.raises(ValueError, match="atol must be > 0, got 0.0"):
        block_ldl.inertia_(torch.eye(3, dtype=F64), atol=0.0)
    with pytest.raises(ValueError, match=r"square \[N, N\].*\(2, 3\)"):
        block_ldl.inertia_(torch.zeros(2, 3, dtype=F64), atol=1.0)
    assert inertia.resolve_factor("auto", torch.eye(3, dtype=F64)) == "bunch_kaufman"  # CPU: LAPACK is fast
    assert inertia.resolve_factor("auto", torch.eye(3, dtype=torch.float32)) == "bunch_kaufman"


@pytest.mark.gpu
@cuda
def test_cuda_blocked_counts_equal_the_cpu_and_stay_in_hs_memory():
    assert inertia.resolve_factor("auto", torch.eye(3, dtype=F64, device="cuda")) == "blocked"
    for H in list(_net_hessians()) + [_planted(700, 12)[0], _zero_diagonal(601, 13)]:
        lam = np.linalg.eigvalsh(H.numpy())
        tol = TOL * abs(lam).max()
        G = H.cuda()
        cpu = inertia.counts(H.clone(), tol, naive=False, factor="bunch_kaufman")
        assert _tolerant(inertia.counts(G, tol, naive=False, factor="blocked")) == _tolerant(cpu)
        assert torch.equal(G.cpu(), H)
    batch = torch.stack([h[:100, :100] for h in _net_hessians()])  # a batch, as a pass counts it
    tols = [TOL * float(np.abs(np.linalg.eigvalsh(h.numpy())).max()) for h in batch]
    # (tolerant counts: these principal blocks have exact zero eigenvalues, whose naive signs are noise)
    assert [_tolerant(c) for c in inertia.counts_many(batch.cuda(), tols)] \
        == [_tolerant(inertia.counts(h.clone(), t, factor="bunch_kaufman")) for h, t in zip(batch, tols)]
    # Memory: H's own plus a few [N, block] panels, where Bunch–Kaufman in place keeps 0.53×H more.
    model = MLP(16, 4, depth=2, width=80, activation="tanh")  # N = 8,164
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(512, 16, generator=g, dtype=F64), torch.randn(512, 4, generator=g, dtype=F64)
    H = hs.hessian(MeanLoss(model, X.cuda(), Y.cuda(), "mse"), model.init(0).cuda())
    n = H.shape[0]
    tol = TOL * max(abs(x) for x in inertia.extreme_eigenvalues(H))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    blocked = inertia.counts(H, tol, naive=False, factor="blocked")
    peak = torch.cuda.max_memory_allocated() - start
    assert peak <= 0.05 * n * n * 8 + 8 * n * block_ldl.BLOCK * 8, (peak, n)
    assert blocked == inertia.counts(H, tol, naive=False, factor="bunch_kaufman")
