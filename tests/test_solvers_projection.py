import dataclasses

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solvers import FeasibleSet, InfeasibleError, Status, project, reference
from solvers.active_set import solve_active_set

F64 = torch.float64


def _random_set(rng: np.random.Generator, K: int, N: int, rows: int) -> FeasibleSet:
    lo = rng.uniform(0, 0.6 / K, K)
    hi = np.maximum(lo + rng.uniform(0.05, 1.0, K), 1.5 / K)
    fs = FeasibleSet.simplex(K, dtype=F64).box(lower=torch.tensor(lo), upper=torch.tensor(hi))
    if rows >= 1 and K >= 2:  # K=1 with a random halfspace may be empty in every row (an error by design)
        a = torch.tensor(rng.uniform(0, 1, (N, K)))
        b = rng.uniform(0.1, 0.6, N)
        b[0] = 1.0  # K=2 with N=6 can be empty in every row too (seed 105219240); keep one row non-empty
        fs = fs.halfspace(a, torch.tensor(b), name="unsafe")
    if rows >= 2 and K >= 3:
        fs = fs.order(0, 1, name="o01")
    return fs


def _check_against_reference(v, fs, atol=1e-6):
    w, info = project(v, fs, return_info=True)
    wr = reference.project(v, fs)
    assert torch.allclose(w, wr, atol=atol, rtol=0), (w - wr).abs().max()
    ok = info.status == int(Status.OPTIMAL)
    assert bool(fs.contains(w, tol=1e-9)[ok].all())
    assert bool((info.kkt_residual[info.status <= 1] <= 1e-9).all())
    return w, info


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), K=st.sampled_from([1, 2, 3, 5, 8]), rows=st.integers(0, 2),
       scale=st.sampled_from([1e-6, 1.0, 1e4]))
def test_matches_cvxpy_reference(seed, K, rows, scale):
    rng = np.random.default_rng(seed)
    N = 6
    fs = _random_set(rng, K, N, rows)
    v = torch.tensor(rng.normal(size=(N, K)) * scale)
    w, _ = _check_against_reference(v, fs)
    assert torch.allclose(project(w, fs), w, atol=1e-10)  # idempotent
    z = reference.project(torch.tensor(rng.normal(size=(N, K))), fs)  # feasible points
    vi = ((v - w) * (z - w)).sum(-1)
    assert bool((vi <= 1e-7 * (1 + v.abs().amax(-1))).all())


def test_reference_is_polished_at_large_scale():
    """Seed 0, K=5, one row at |v| ~ 1e4: Clarabel alone is ~6e-6 off in w; the polished reference agrees to 1e-6."""
    rng = np.random.default_rng(0)
    fs = _random_set(rng, 5, 6, 1)
    v = torch.tensor(rng.normal(size=(6, 5)) * 1e4)
    _check_against_reference(v, fs)


def test_degenerate_cases():
    # ties
    v = torch.tensor([[0.3, 0.3, 0.3, 0.1], [1.0, 1.0, 1.0, 1.0]], dtype=F64)
    fs = FeasibleSet.simplex(4, dtype=F64).cap(0, 0.2)
    _check_against_reference(v, fs)
    # all bounds active / single feasible point
    fs1 = FeasibleSet.simplex(3, dtype=F64).box(lower=torch.tensor([0.2, 0.3, 0.5], dtype=F64), upper=torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    w = project(torch.randn(4, 3, dtype=F64), fs1)
    assert torch.allclose(w, fs1.lower.expand(4, 3), atol=1e-12)
    # K = 1
    assert torch.equal(project(torch.tensor([[5.0]], dtype=F64), FeasibleSet.simplex(1, dtype=F64)), torch.ones(1, 1, dtype=F64))
    # a halfspace that admits only one point (w0 = 1)
    fs2 = FeasibleSet.simplex(3, dtype=F64).halfspace([0.0, 1.0, 1.0], 0.0, name="only0")
    w, info = project(torch.randn(5, 3, dtype=F64), fs2, return_info=True)
    assert torch.allclose(w, torch.tensor([1.0, 0, 0], dtype=F64).expand(5, 3), atol=1e-9)
    assert bool((info.status == int(Status.OPTIMAL)).all())


def test_per_row_batched_sets_and_shapes():
    rng = np.random.default_rng(1)
    fs = FeasibleSet.simplex(4, dtype=F64).halfspace(torch.tensor(rng.uniform(size=(2, 3, 4))),
                                                    torch.tensor(rng.uniform(0.2, 0.5, (2, 3))), name="u")
    v = torch.tensor(rng.normal(size=(2, 3, 4)))
    w, info = _check_against_reference(v, fs)
    assert w.shape == v.shape and info.status.shape == (2, 3) and info.active.shape == (2, 3, 1)


def test_float32_simplex_matches_float64():
    v = torch.randn(64, 8)
    fs = FeasibleSet.simplex(8).cap(0, 0.2).floor(1, 0.05)
    w32 = project(v, fs)
    w64 = project(v.double(), fs.to(dtype=F64))
    assert w32.dtype == torch.float32 and torch.allclose(w32.double(), w64, atol=1e-6)


def test_relaxed_rows_and_all_empty_error():
    fs = FeasibleSet.simplex(3, dtype=F64).halfspace(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=F64),
                                                      torch.tensor([0.5, 0.5], dtype=F64), name="u")
    v = torch.randn(2, 3, dtype=F64)
    w, info = project(v, fs, return_info=True)
    assert info.status.tolist() == [int(Status.RELAXED), int(Status.OPTIMAL)]
    assert abs(float(info.relaxation[0]) - 0.5) < 1e-12 and float(info.relaxation[1]) == 0.0
    assert torch.allclose(w, reference.project(v, fs), atol=1e-6)
    # two rows jointly empty (each feasible alone): relaxed by the least uniform t = 0.25
    fs2 = FeasibleSet.simplex(2, dtype=F64).halfspace([1.0, 0.0], 0.25, name="a").halfspace([0.0, 1.0], 0.25, name="b")
    with pytest.raises(InfeasibleError, match="a.*b"):
        project(torch.randn(3, 2, dtype=F64), fs2)
    fs3 = FeasibleSet.simplex(2, dtype=F64).cap(0, 0.3, name="c0").cap(1, 0.3, name="c1")
    with pytest.raises(InfeasibleError, match="sum to 0.6 < 1"):
        project(torch.randn(3, 2, dtype=F64), fs3)


def test_jointly_empty_rows_in_a_batch_are_relaxed():
    bound = torch.tensor([[0.25, 0.25], [0.8, 0.8]], dtype=F64)
    fs = FeasibleSet.simplex(2, dtype=F64).halfspace(torch.tensor([1.0, 0.0], dtype=F64), bound[:, 0], name="a") \
        .halfspace(torch.tensor([0.0, 1.0], dtype=F64), bound[:, 1], name="b")
    v = torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=F64)
    w, info = project(v, fs, return_info=True)
    assert info.status.tolist() == [int(Status.RELAXED), int(Status.OPTIMAL)]
    assert abs(float(info.relaxation[0]) - 0.25) < 1e-9
    assert torch.allclose(w, torch.tensor([[0.5, 0.5], [0.8, 0.2]], dtype=F64), atol=1e-8)


@pytest.mark.parametrize(
    "v, fs, match",
    [
        (torch.tensor([[float("nan"), 0.0]]), FeasibleSet.simplex(2), "v contains NaN"),
        (torch.tensor([[float("inf"), 0.0]]), FeasibleSet.simplex(2), "v contains NaN"),
        (torch.zeros(2, 3), FeasibleSet.simplex(2), r"v must have shape \[..., K=2\]"),
        (torch.zeros(4, 2), FeasibleSet.simplex(2).halfspace(torch.ones(3, 2), 1.0), "fset batch shape"),
        (torch.zeros(4, 2), FeasibleSet.simplex(2), "strictly positive"),
    ],
)
def test_bad_input_names_argument(v, fs, match):
    with pytest.raises(ValueError, match=match):
        project(v, fs, metric="kl" if match == "strictly positive" else "euclidean")


def test_kl_matches_reference():
    rng = np.random.default_rng(3)
    v = torch.tensor(rng.dirichlet(np.ones(5), size=6))
    fs = FeasibleSet.simplex(5, dtype=F64).cap(0, 0.15).floor(4, 0.3)
    w = project(v, fs, metric="kl")
    assert torch.allclose(w, reference.project(v, fs, metric="kl"), atol=1e-6)
    assert bool(fs.contains(w, tol=1e-9).all())
    assert torch.allclose(project(v, FeasibleSet.simplex(5, dtype=F64), metric="kl"), v / v.sum(-1, keepdim=True), atol=1e-12)


def test_gradcheck_euclidean_and_kl():
    torch.manual_seed(0)
    fs = FeasibleSet.simplex(5, dtype=F64).cap(0, 0.3).floor(1, 0.05).halfspace([0.9, 0.1, 0.5, 0.2, 0.7], 0.3, name="u")
    v = torch.tensor([[0.9, 0.1, 0.4, -0.3, 0.6], [0.2, 0.5, 0.3, 0.1, 0.0]], dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: project(x, fs), (v,))
    fsb = FeasibleSet.simplex(5, dtype=F64).cap(0, 0.3)
    torch.autograd.gradcheck(lambda x: project(x, fsb), (v,))
    p = torch.tensor([[0.4, 0.1, 0.2, 0.15, 0.15]], dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: project(x, fsb, metric="kl"), (p,))


def test_reference_is_dpp_and_takes_extra_constraints():
    prob, params, w, _ = reference.build_problem(4, 1, "euclidean")
    assert prob.is_dpp()
    assert reference.build_problem(4, 0, "kl")[0].is_dpp()
    v = torch.tensor([[2.0, 0.0, 0.0, 0.0]], dtype=F64)
    prior = np.full(4, 0.25)
    out = reference.project(v, FeasibleSet.simplex(4, dtype=F64), extra_constraints=lambda w: [cp.norm(w - prior) <= 0.1])
    assert abs(float((out[0] - torch.tensor(prior)).norm()) - 0.1) < 1e-6


# ---------------------------------------------------------------------------------------------- several rows (active set)
def _family_set(rng: np.random.Generator, K: int, N: int, group: bool, tied: bool) -> FeasibleSet:
    """safekd's typical sets: caps/floors + per-token unsafe-mass halfspace + order_by(safety) (+ group cap)."""
    safety = rng.integers(0, 2, K) if tied else rng.permutation(K)
    fs = FeasibleSet.simplex(K, dtype=F64).cap(int(rng.integers(K)), float(rng.uniform(1.0 / K, 0.6)), name="cap")
    fs = fs.floor(int(np.argmax(safety)), float(rng.uniform(0, 0.5 / K)), name="floor")
    a = rng.uniform(0, 1, (N, K))
    if tied:
        a = np.round(2 * a) / 2
    b = np.r_[2.0, rng.uniform(0.05, 0.5, N - 1)]  # first token: an always non-empty set
    fs = fs.halfspace(torch.tensor(a), torch.tensor(b), name="unsafe").order_by(torch.tensor(safety, dtype=F64), name="safety")
    if group:
        low = np.argsort(safety)[:2]  # the two least safe teachers
        fs = fs.group_cap([int(i) for i in low], float(rng.uniform(2.0 / K, 0.9)), name="group")
    return fs


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), K=st.sampled_from([2, 3, 4, 5, 8]), group=st.booleans(), tied=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_families_c_d_match_reference_without_max_iter(seed, K, group, tied, scale):
    rng = np.random.default_rng(seed)
    N = 8
    fs = _family_set(rng, K, N, group and K >= 3, tied)
    v = rng.normal(size=(N, K)) * scale
    if tied:
        v = np.round(2 * v) / 2  # ties in v
    v = torch.tensor(v)
    w, info = project(v, fs, return_info=True)
    assert bool((info.status <= int(Status.RELAXED)).all()), info.status  # no MAX_ITER / NUMERICAL rows
    assert bool((info.kkt_residual <= 1e-9).all())
    wr = reference.project(v, fs)
    relaxed = FeasibleSet(fs.lower, fs.upper, fs.A, fs.b + info.relaxation[:, None], fs.row_names)
    assert bool(relaxed.contains(w, tol=1e-9).all())
    # ties and thin (relaxed) sets make the optimum degenerate, where cvxpy's interior point drifts by ~1e-6:
    # a row agrees to 1e-6 or has an objective no worse than cvxpy's (w is feasible, so it is then the better one)
    close = (w - wr).abs().amax(-1) <= 1e-6
    no_worse = (w - v).square().sum(-1) <= (wr - v).square().sum(-1) + 1e-12
    assert bool((close | no_worse).all()), (w - wr).abs().max()
    assert float(close.double().mean()) >= 0.5
    assert int(info.iterations.max()) <= 4 * (2 * K + fs.num_rows + 1)


def test_dependent_active_constraints_and_tied_order_rows():
    # only point: w0 ≥ w1 ≥ w2 with w0 ≤ 1/3 forces w = 1/3; active normals (2 chain rows, cap, Σw=1) are dependent
    fs = FeasibleSet.simplex(3, dtype=F64).cap(0, 1.0 / 3).order_by(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    v = torch.tensor([[0.0, 1.0, 2.0], [5.0, -1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=F64)
    w, info = project(v, fs, return_info=True)
    assert torch.allclose(w, torch.full_like(w, 1.0 / 3), atol=1e-12)
    assert info.status.tolist() == [int(Status.OPTIMAL)] * 3 and bool((info.kkt_residual <= 1e-12).all())
    # tied scores give zero rows (never active); the remaining order w0 ≥ {w1, w2} pools the violators
    fs2 = FeasibleSet.simplex(3, dtype=F64).order_by(torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    w2, info2 = project(torch.tensor([[0.0, 0.6, 0.6]], dtype=F64), fs2, return_info=True)
    assert torch.allclose(w2, torch.tensor([[0.4, 0.4, 0.2]], dtype=F64), atol=1e-12) or \
        torch.allclose(w2, reference.project(torch.tensor([[0.0, 0.6, 0.6]], dtype=F64), fs2), atol=1e-7)
    assert not bool(info2.active[0, 1])


def test_one_row_only_violated_rows_iterate_and_few_steps():
    rng = np.random.default_rng(7)
    K, N = 8, 2048
    fs = FeasibleSet.simplex(K, dtype=F64).cap(0, 0.45).floor(1, 0.02)
    a = torch.tensor(rng.uniform(0, 0.3, (N, K)))
    v = torch.softmax(torch.tensor(rng.normal(size=(N, K)) * 1.5), -1)
    w0 = project(v, fs)
    eps = torch.quantile((a * w0).sum(-1), 0.75)
    fs1 = fs.halfspace(a, eps.expand(N), name="unsafe")
    w, info = project(v, fs1, return_info=True)
    feasible0 = (a * w0).sum(-1) <= eps
    assert 0.2 < float((~feasible0).double().mean()) < 0.3
    assert bool((info.iterations[feasible0] == 0).all())
    assert torch.allclose(w[feasible0], w0[feasible0], atol=1e-14, rtol=0)
    assert int(info.iterations.max()) <= 12 and bool((info.iterations[~feasible0] >= 1).all())
    assert bool((info.status <= int(Status.RELAXED)).all()) and bool((info.kkt_residual <= 1e-9).all())
    idx = (~feasible0).nonzero()[:20, 0]
    assert torch.allclose(w[idx], reference.project(v[idx], fs1[idx]), atol=1e-6)


def test_float32_several_rows_matches_float64():
    rng = np.random.default_rng(11)
    fs = _family_set(rng, 5, 64, group=True, tied=False)
    v = torch.tensor(rng.normal(size=(64, 5)))
    w64, i64 = project(v, fs, return_info=True)
    w32, i32 = project(v.float(), fs.to(dtype=torch.float32), return_info=True)
    assert w32.dtype == torch.float32 and i32.kkt_residual.dtype == torch.float32
    assert torch.equal(i32.status, i64.status) and bool((i32.status <= int(Status.RELAXED)).all())
    ok = i64.status == int(Status.OPTIMAL)
    assert bool(ok.sum() >= 16) and torch.allclose(w32.double()[ok], w64[ok], atol=1e-5)
    # relaxed rows sit on thin sets whose relaxation t itself carries float32 round-off
    assert torch.allclose(w32.double()[~ok], w64[~ok], atol=1e-3)


def test_gradcheck_several_rows():
    fs = (FeasibleSet.simplex(5, dtype=F64).cap(4, 0.35).halfspace([0.1, 0.9, 0.5, 0.2, 0.7], 0.35, name="u")
          .order_by(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64)).group_cap([3, 4], 0.3, name="g"))
    v = torch.tensor([[0.1, 0.9, 0.4, -0.3, 0.6], [0.2, 0.5, 0.35, 0.1, 0.0], [1.0, 0.0, 0.3, 0.8, 0.45]],
                     dtype=F64, requires_grad=True)
    _, info = project(v.detach(), fs, return_info=True)
    assert bool(info.active.any(-1).all())  # every row has an active halfspace/order row
    torch.autograd.gradcheck(lambda x: project(x, fs), (v,))


def test_max_iter_rows_fall_back_to_reference_and_are_flagged():
    rng = np.random.default_rng(5)
    fs = _family_set(rng, 5, 6, group=True, tied=False)
    v = torch.tensor(rng.normal(size=(6, 5)) * 10)
    _, full = project(v, fs, return_info=True)
    hard = full.iterations > 1
    assert bool(hard.any())
    w, info = project(v, fs, return_info=True, max_iter=1)
    assert bool((info.status[hard] == int(Status.MAX_ITER)).all()) and not info.success
    assert torch.allclose(w, reference.project(v, fs), atol=1e-6)
    with pytest.raises(ValueError, match="max_iter"):
        project(v, fs, max_iter=0)


def test_active_set_detects_an_empty_set():
    # Σw = 1 with w0 + w1 ≤ 0.5 is empty: no step can satisfy the row, the row is reported unconverged
    lo, hi = torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)
    x0 = torch.tensor([[0.5, 0.5]], dtype=F64)
    res = solve_active_set(lo, hi, torch.ones(1, 1, 2, dtype=F64), torch.tensor([[0.5]], dtype=F64), x0, x0)
    assert not bool(res.converged[0])
    ok = solve_active_set(lo, hi, torch.tensor([[[1.0, 0.0]]], dtype=F64), torch.tensor([[0.2]], dtype=F64), x0, x0)
    assert bool(ok.converged[0]) and torch.allclose(ok.x, torch.tensor([[0.2, 0.8]], dtype=F64), atol=1e-15)
    assert torch.allclose(ok.mu, torch.tensor([[0.6]], dtype=F64), atol=1e-15)  # w − v = −μ a − τ 1, τ = −0.3


def test_hard_rows_are_kept_when_a_row_is_relaxed():
    """Only soft rows move: an order chain declared hard stays satisfied on a token whose halfspace is empty."""
    K = 3
    fs = (FeasibleSet.simplex(K, dtype=torch.float64).order_by(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), hard=True)
          .expand((2,)).halfspace(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64),
                                  torch.tensor([0.1, 0.5], dtype=torch.float64), name="unsafe"))
    v = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]], dtype=torch.float64)
    w, info = project(v, fs, return_info=True)
    # row 0: w0 ≤ 0.1 with w0 ≥ w1 ≥ w2 forces w0 ≥ 1/3: the least relaxation is t = 1/3 − 0.1, the chain holds
    assert info.status.tolist() == [int(Status.RELAXED), int(Status.OPTIMAL)]
    assert abs(float(info.relaxation[0]) - (1 / 3 - 0.1)) < 1e-9
    assert torch.allclose(w[0], torch.full((K,), 1 / 3, dtype=torch.float64), atol=1e-9)
    ref = reference.project(v, fs)
    assert torch.allclose(w, ref, atol=1e-6)
    # the same set with every row soft relaxes the chain too (the uniform relaxation moves all rows)
    soft = FeasibleSet(fs.lower, fs.upper, fs.A, fs.b, fs.row_names)
    w_soft, info_soft = project(v, soft, return_info=True)
    assert float(info_soft.relaxation[0]) < float(info.relaxation[0])
    assert torch.allclose(w_soft, reference.project(v, soft), atol=1e-6)


def test_on_all_empty_relax_keeps_the_batch():
    fs = FeasibleSet.simplex(2, dtype=torch.float64).halfspace([1.0, 1.0], 0.5, name="too_tight")
    v = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    with pytest.raises(InfeasibleError):
        project(v, fs)
    w, info = project(v, fs, return_info=True, on_all_empty="relax")
    assert info.status.tolist() == [int(Status.RELAXED)] * 2
    assert torch.allclose(info.relaxation, torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.allclose(w, v)
    with pytest.raises(ValueError, match="on_all_empty"):
        project(v, fs, on_all_empty="ignore")


def test_batched_relaxation_lp_matches_per_row_lps():
    from solvers.diagnosis import least_uniform_relaxation

    g = torch.Generator().manual_seed(3)
    n, m, K = 12, 3, 4
    lo, hi = torch.zeros(n, K, dtype=torch.float64), torch.full((n, K), 0.6, dtype=torch.float64)
    A = torch.rand(n, m, K, generator=g, dtype=torch.float64)
    b = torch.rand(n, m, generator=g, dtype=torch.float64) * 0.3
    b[:, 0] = 0.5 * A[:, 0].sum(-1) / K + 0.5 * A[:, 0].amax(-1)  # the hard row alone is satisfiable ...
    b[-1, 0] = -1.0  # ... except on the last element, which therefore relaxes every row
    hard = np.array([True, False, False])
    t, rows = least_uniform_relaxation(lo.numpy(), hi.numpy(), A.numpy(), b.numpy(), hard)
    assert rows.shape == (n, m) and not rows[:-1, 0].any() and rows[:, 1:].all() and rows[-1].all()
    for i in range(n):
        t_i, _ = least_uniform_relaxation(lo[i:i + 1].numpy(), hi[i:i + 1].numpy(), A[i:i + 1].numpy(),
                                          b[i:i + 1].numpy(), hard)
        assert abs(t[i] - t_i[0]) < 1e-9


# ---------------------------------------------------------------------------------------------- ordinal chain fast path
def _chain_set(rng: np.random.Generator, K: int, N: int, box: bool, halfspace: bool, tied: bool,
               per_row: bool) -> FeasibleSet:
    """Chain (order_by) sets that contain the uniform point 1/K (never empty): + caps/floors, + a halfspace."""
    shape = (N, K) if per_row else (K,)
    scores = rng.integers(0, 3, shape) if tied else rng.permuted(np.tile(np.arange(K), (N, 1)), axis=-1) \
        if per_row else rng.permutation(K)
    fs = FeasibleSet.simplex(K, dtype=F64)
    if box:
        fs = fs.cap(int(rng.integers(K)), float(rng.uniform(1.0 / K, 1.0)), name="cap")
        fs = fs.floor(int(rng.integers(K)), float(rng.uniform(0, 1.0 / K)), name="floor")
    fs = fs.order_by(torch.tensor(scores, dtype=F64), name="chain")
    if halfspace:
        a = rng.uniform(0, 1, (N, K))
        fs = fs.halfspace(torch.tensor(a), torch.tensor(a.mean(-1) + rng.uniform(0, 0.3, N)), name="unsafe")
    return fs


def test_isotonic_decreasing_matches_pav_with_split_chains():
    from sklearn.isotonic import IsotonicRegression

    from solvers.isotonic import isotonic_decreasing

    rng = np.random.default_rng(0)
    for K in (1, 2, 5, 16, 64):
        y = rng.normal(size=(40, K)) * 3 + 5
        y[:10] = np.round(y[:10])  # ties in y
        links = rng.uniform(size=(40, max(K - 1, 0))) < 0.8
        iso, mu, same = isotonic_decreasing(torch.tensor(y), torch.tensor(links))
        for i in range(40):
            seg = np.r_[0, np.cumsum(~links[i])]
            ref = np.concatenate([IsotonicRegression(increasing=False).fit_transform(np.arange((seg == s).sum()), y[i, seg == s])
                                  for s in np.unique(seg)])
            assert np.abs(iso[i].numpy() - ref).max() <= 1e-12
        # stationarity iso − y + Σ_k μ_k (e_{k+1} − e_k) = 0, μ ≥ 0, μ = 0 off the blocks and on unlinked pairs
        st = iso - torch.tensor(y)
        st[:, 1:] += mu
        st[:, :-1] -= mu
        assert float(st.abs().max()) <= 1e-11 and bool((mu >= 0).all()) and not bool(mu[~torch.tensor(links)].any())
        assert not bool(mu[~same].any())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), K=st.sampled_from([1, 2, 3, 5, 8, 16]), box=st.booleans(), halfspace=st.booleans(),
       tied=st.booleans(), per_row=st.booleans(), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_chain_sets_match_reference(seed, K, box, halfspace, tied, per_row, scale):
    rng = np.random.default_rng(seed)
    N = 6
    fs = _chain_set(rng, K, N, box, halfspace, tied, per_row)
    v = torch.tensor(rng.normal(size=(N, K)) * scale)
    w, info = _check_against_reference(v, fs)
    assert bool((info.status == int(Status.OPTIMAL)).all()) and bool((info.kkt_residual <= 1e-9).all())
    assert torch.allclose(info.multipliers * fs.residual(w), torch.zeros_like(w[:, :1]), atol=1e-9)  # complementarity


def test_chain_superset_path_taken_and_not_taken():
    """Chain-violating rows whose isotonic point lies in the set are solved without active-set steps (exact, with the
    isotonic multipliers); rows where a cap binds fall through to the active set; both agree with cvxpy."""
    K = 5
    fs = FeasibleSet.simplex(K, dtype=F64).cap(0, 0.5, name="cap").order_by(torch.tensor([5.0, 4, 3, 2, 1], dtype=F64))
    v = torch.tensor([[0.1, 0.3, 0.2, 0.4, 0.0],   # chain violated, isotonic point inside the cap: fast path
                      [2.0, 0.0, 1.0, 0.0, 0.0],   # w0 wants > 0.5: the cap binds, active set
                      [0.4, 0.3, 0.2, 0.1, 0.0]], dtype=F64)  # already feasible
    w, info = _check_against_reference(v, fs)
    assert info.iterations.tolist()[0] == 0 and int(info.iterations[1]) >= 1 and int(info.iterations[2]) == 0
    assert torch.allclose(w[0], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0], dtype=F64), atol=1e-12)
    assert info.active[0].tolist() == [True, True, True, False] and not bool(info.active[2].any())
    # μ_k = Σ_{l≤k} (block mean − v_l) over the pooled block (v_0..v_3, mean 0.25)
    assert torch.allclose(info.multipliers[0], torch.tensor([0.15, 0.1, 0.15, 0.0], dtype=F64), atol=1e-12)
    assert bool(info.active_upper[1, 0])


def test_chain_with_one_active_halfspace_is_solved_in_closed_form():
    rng = np.random.default_rng(4)
    K, N = 8, 64
    order = rng.permutation(K)
    v = torch.tensor(rng.normal(size=(N, K)))
    a = torch.tensor(rng.uniform(0, 1, (N, K)))
    fs = FeasibleSet.simplex(K, dtype=F64).order_by(torch.tensor(order, dtype=F64)).halfspace(a, a.mean(-1) + 0.02, name="u")
    w, info = project(v, fs, return_info=True)
    u = info.active[:, -1]
    assert int(u.sum()) >= 10 and bool((info.iterations[u] == 0).all())  # halfspace active, no active-set steps
    assert bool((info.kkt_residual <= 1e-9).all()) and bool((info.status == int(Status.OPTIMAL)).all())
    idx = u.nonzero()[:12, 0]
    assert torch.allclose(w[idx], reference.project(v[idx], fs[idx]), atol=1e-6)


def test_chain_is_carried_by_set_operations_and_stale_chains_are_safe():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]], dtype=F64)
    fs = FeasibleSet.simplex(3, dtype=F64).cap(1, 0.9).order_by(scores).order_by([1.0, 2.0, 3.0], name="second")
    assert fs.chain.tolist() == [[0, 2, 1], [2, 1, 0]] and fs.chain_start == 0  # the first order_by is the chain
    assert fs[1].chain.tolist() == [2, 1, 0] and fs.expand((4, 2)).chain.shape == (4, 2, 3)
    assert fs.to(dtype=torch.float32).chain.dtype == torch.long and FeasibleSet.simplex(3).chain is None
    with pytest.raises(ValueError, match="chain"):
        dataclasses.replace(fs, chain=fs.chain.double())
    # a chain that no longer matches the rows (A replaced) is caught by the verification: still the exact projection
    v = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]], dtype=F64)
    stale = dataclasses.replace(fs, A=fs.A.flip(-1))
    w, info = project(v, stale, return_info=True)
    assert torch.allclose(w, reference.project(v, stale), atol=1e-6) and bool((info.kkt_residual <= 1e-9).all())


def test_chain_float32_and_gradcheck():
    rng = np.random.default_rng(9)
    fs = _chain_set(rng, 6, 32, box=True, halfspace=True, tied=False, per_row=True)
    v = torch.tensor(rng.normal(size=(32, 6)))
    w64, i64 = project(v, fs, return_info=True)
    w32, i32 = project(v.float(), fs.to(dtype=torch.float32), return_info=True)
    assert w32.dtype == torch.float32 and bool((i32.status == int(Status.OPTIMAL)).all())
    assert torch.allclose(w32.double(), w64, atol=1e-5)
    # gradcheck on rows solved by the fast path (chain blocks, a zero tail, an active halfspace)
    fsg = FeasibleSet.simplex(4, dtype=F64).order_by(torch.tensor([4.0, 3, 2, 1], dtype=F64)) \
        .halfspace([0.9, 0.1, 0.3, 0.2], 0.45, name="u")
    vg = torch.tensor([[0.1, 0.5, 0.2, -0.3], [0.2, 0.25, 0.8, 0.0], [0.0, 0.1, 0.3, 0.7]], dtype=F64, requires_grad=True)
    _, info = project(vg.detach(), fsg, return_info=True)
    assert bool((info.iterations == 0).all()) and bool(info.active.any(-1).all())
    torch.autograd.gradcheck(lambda x: project(x, fsg), (vg,))


@pytest.mark.parametrize("tied", [False, True])
def test_chain_backward_by_blocks_passes_gradcheck(tied):
    """The backward takes the chain rows by block averaging (a block touching a bound is fixed); gradcheck on chain
    sets with caps, floors, ties in the scores (unlinked pairs) and an extra halfspace, on and off the simplex."""
    rng = np.random.default_rng(12 + tied)
    for halfspace in (False, True):
        fs = _chain_set(rng, 6, 8, box=True, halfspace=halfspace, tied=tied, per_row=True)
        v = torch.tensor(rng.normal(size=(8, 6))).requires_grad_(True)
        _, info = project(v.detach(), fs, return_info=True)
        assert bool(info.active.any()) and bool((info.active_lower | info.active_upper).any())
        assert torch.autograd.gradcheck(lambda x: project(x, fs), (v,))


def test_chain_closed_forms_by_k():
    """The chain point is exact for every K; one active halfspace on the chain is closed-form by enumeration up to
    K = 5 and by the Newton path above."""
    rng = np.random.default_rng(2)
    for K in (4, 5, 7, 8):
        order = torch.tensor(rng.permutation(K), dtype=F64)
        v = torch.tensor(rng.normal(size=(16, K)))
        fs = FeasibleSet.simplex(K, dtype=F64).order_by(order, hard=True)
        w, info = project(v, fs, return_info=True)
        assert bool((info.iterations == 0).all()) and bool((info.kkt_residual <= 1e-9).all())
        assert torch.allclose(w, reference.project(v, fs), atol=1e-6)
        a = torch.tensor(rng.uniform(0, 1, (16, K)))
        fs_h = fs.halfspace(a, a.mean(-1) - 0.02, name="u")  # some rows are empty: relaxed (the chain is hard)
        w, info = project(v, fs_h, return_info=True)
        on = info.active[:, -1] & (info.relaxation == 0)
        assert int(on.sum()) >= 4 and bool((info.kkt_residual <= 1e-9).all())
        assert bool((info.iterations[on] == 0).all())
        relaxed = dataclasses.replace(fs_h, b=fs_h.b + info.relaxation[:, None] * torch.tensor([0.0] * (K - 1) + [1.0], dtype=F64))
        assert torch.allclose(w, reference.project(v, relaxed), atol=1e-6)
        if K <= 5:  # on a relaxed row (one point: a vertex of the ordered simplex) as well
            assert bool((info.relaxation > 0).any()) and bool((info.iterations == 0).all())


def test_backward_gram_solve_matches_the_pseudo_inverse_with_dependent_rows():
    """The implicit Jacobian's Gram solve (Cholesky) agrees with the pseudo-inverse, also where active rows are
    dependent on the free coordinates (the pseudo-inverse branch) or zero there."""
    from solvers.projection import _EuclidFn

    g = torch.Generator().manual_seed(0)
    N, m, K = 6, 3, 5
    A = torch.rand(N, m, K, generator=g, dtype=F64)
    free = torch.ones(N, K, dtype=torch.bool)
    free[:, 4] = False
    A[:2, 1, :4] = 2 * A[:2, 0, :4]  # rows 0 and 1 dependent on F in batch elements 0, 1
    A[2, 2, :4] = 0.0  # a row that is zero on F
    v = torch.randn(N, K, generator=g, dtype=F64, requires_grad=True)
    out = torch.randn(N, K, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad(_EuclidFn.apply(v, v.detach(), free, A), v, out)
    M = torch.cat([free[:, None, :].to(F64), A * free[:, None, :]], dim=-2)
    gF = out * free
    expected = gF - (M.mT @ (torch.linalg.pinv(M @ M.mT, hermitian=True) @ (M @ gF[..., None])))[..., 0]
    assert torch.allclose(grad, expected, atol=1e-12, rtol=0)


def test_float32_row_relaxed_by_round_off_is_solved_in_float64():
    """A float32 row whose least relaxation, computed in float32, left its set empty: the active set stalled and the
    cvxpy fallback returned NaN. The rescue relaxes and re-solves such rows in float64."""
    import json
    from pathlib import Path

    d = json.loads((Path(__file__).parent / "data" / "relaxed_float32_row.json").read_text())
    t = lambda x: torch.tensor([x], dtype=torch.float32)  # noqa: E731
    fs = FeasibleSet(t(d["lower"]), t(d["upper"]), t(d["A"]), t(d["b"]), tuple(d["row_names"]),
                     hard_rows=tuple(d["hard_rows"]), chain=torch.tensor([d["chain"]]), chain_start=d["chain_start"])
    v = t(d["v"])
    w, info = project(v, fs, return_info=True, on_all_empty="relax")
    w64, info64 = project(v.double(), fs.to(dtype=torch.float64), return_info=True, on_all_empty="relax")
    assert torch.isfinite(w).all() and int(info.status[0]) == int(Status.RELAXED)
    assert float(info.kkt_residual[0]) <= 1e-5 and float(info.relaxation[0]) == pytest.approx(float(info64.relaxation[0]), rel=1e-5)
    assert float((w.double() - w64).abs().max()) <= 1e-5
