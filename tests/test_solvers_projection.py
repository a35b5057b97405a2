import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solvers import FeasibleSet, InfeasibleError, Status, project, reference

F64 = torch.float64


def _random_set(rng: np.random.Generator, K: int, N: int, rows: int) -> FeasibleSet:
    lo = rng.uniform(0, 0.6 / K, K)
    hi = np.maximum(lo + rng.uniform(0.05, 1.0, K), 1.5 / K)
    fs = FeasibleSet.simplex(K, dtype=F64).box(lower=torch.tensor(lo), upper=torch.tensor(hi))
    if rows >= 1 and K >= 2:  # K=1 with a random halfspace may be empty in every row (an error by design)
        a = torch.tensor(rng.uniform(0, 1, (N, K)))
        fs = fs.halfspace(a, torch.tensor(rng.uniform(0.1, 0.6, N)), name="unsafe")
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
