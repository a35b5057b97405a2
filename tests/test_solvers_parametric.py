"""Fixed-shape projection onto box∩simplex∩one halfspace (solvers.parametric) and its use by solvers.project."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solvers import FeasibleSet, Status, project, reference
from solvers.parametric import bracket_box_halfspace, project_box_halfspace
from solvers.projection import _argmin_linear

F64 = torch.float64


def _all_outside(rng: np.random.Generator, K: int, N: int, logits: bool = False,
                 ties: bool = False) -> tuple[torch.Tensor, FeasibleSet]:
    """Every row violates its halfspace at the box∩simplex projection, and every set is non-empty (``ties``: ``a``
    rounded to tenths, so coordinates share their value of ``a``)."""
    v = torch.tensor(rng.normal(size=(N, K)) * 2.0) if logits else torch.softmax(torch.tensor(rng.normal(size=(N, K)) * 1.5), -1)
    fs = FeasibleSet.simplex(K, dtype=F64).cap(0, 0.45).floor(1, 0.02)
    a = torch.tensor(rng.uniform(0, 0.3, (N, K)))
    if ties:
        a = (a * 10).round() / 10
    lo, hi = fs.lower.expand(N, K), fs.upper.expand(N, K)
    a_min = (a * _argmin_linear(a[:, None], lo, hi)[:, 0]).sum(-1)
    a_w0 = (a * project(v, fs)).sum(-1)
    q = torch.tensor(rng.uniform(0.05, 0.95, N))
    return v, fs.halfspace(a, a_min + q * (a_w0 - a_min), name="unsafe")


def _fast(v: torch.Tensor, fs: FeasibleSet, **kw):
    N, K = v.shape
    return project_box_halfspace(v, fs.lower.expand(N, K), fs.upper.expand(N, K), fs.A.expand(N, 1, K)[:, 0],
                                 fs.b.expand(N, 1)[:, 0], tol=1e-10, **kw)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), K=st.sampled_from([2, 3, 4, 8, 16]), logits=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_certified_rows_match_cvxpy(seed, K, logits, scale):
    rng = np.random.default_rng(seed)
    v, fs = _all_outside(rng, K, 12, logits)
    v = v * scale
    res = _fast(v, fs)
    ok = res.certified
    assert bool((res.kkt_residual[ok] <= 1e-10).all()) and bool((res.mu[ok] >= 0).all())
    wr = reference.project(v, fs)
    assert torch.allclose(res.w[ok], wr[ok], atol=1e-6, rtol=0)
    w, info = project(v, fs, return_info=True)  # uncertified rows reach the general path: all rows exact
    assert torch.allclose(w, wr, atol=1e-6, rtol=0)
    assert bool((info.status == int(Status.OPTIMAL)).all()) and bool((info.kkt_residual <= 1e-9).all())


@pytest.mark.parametrize("K", [4, 8, 16])
def test_most_rows_outside_are_certified(K):
    """The fixed number of steps certifies almost every row of the benchmark's all-outside family."""
    v, fs = _all_outside(np.random.default_rng(K), K, 2048)
    res = _fast(v, fs)
    assert float(res.certified.double().mean()) >= 0.99
    N = v.shape[0]
    w0 = project(v, FeasibleSet(fs.lower, fs.upper, fs.A[..., :0, :], fs.b[..., :0]))  # box∩simplex, at μ = 0
    violated = (fs.A.expand(N, 1, K)[:, 0] * w0).sum(-1) > fs.b.expand(N, 1)[:, 0] + 1e-12
    assert bool((res.iterations[violated] >= 1).all())  # steps on μ wherever the row binds
    w, info = project(v, fs, return_info=True)
    assert torch.allclose(w[res.certified], res.w[res.certified], atol=1e-9, rtol=0)  # two certified points


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, logits", [(4, False), (8, True), (16, False)])
def test_fixed_shape_path_meets_the_bounds_exactly(K, logits, dtype):
    """Every point the kernel keeps is a clamp into [lo, hi] (the kept iterate is an exact select), so project()'s
    fixed-shape path meets caps and floors with no tolerance, also after the cast back to float32."""
    v, fs = _all_outside(np.random.default_rng(K), K, 1500, logits)
    v, fs = v.to(dtype), fs.to(dtype=dtype)
    w, info = project(v, fs, return_info=True)
    assert bool((w >= fs.lower).all()) and bool((w <= fs.upper).all())
    assert bool((info.status == int(Status.OPTIMAL)).all())


def test_uncertified_rows_are_solved_exactly_by_the_fallbacks():
    """Off-simplex points (logits) leave some rows uncertified by the default steps: project() reruns the kernel
    with more steps on them, then the active set on what is left; every row ends exact and OPTIMAL."""
    v, fs = _all_outside(np.random.default_rng(4), 8, 1024, logits=True)
    res = _fast(v, fs)
    rest = (~res.certified).nonzero()[:, 0]
    assert rest.numel() >= 5
    w, info = project(v, fs, return_info=True)
    assert bool((info.status == int(Status.OPTIMAL)).all()) and bool((info.kkt_residual <= 1e-9).all())
    assert torch.allclose(w[rest], reference.project(v[rest], fs[rest]), atol=1e-6, rtol=0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), K=st.sampled_from([2, 3, 5, 8, 16]), logits=st.booleans(),
       ties=st.booleans())
def test_bracketing_search_matches_cvxpy(seed, K, logits, ties):
    """The retry for the few rows the kernel leaves: certified rows equal a tight cvxpy solve; off-simplex and
    tied rows included (ties in ``a`` make the multiplier's path flat in places)."""
    rng = np.random.default_rng(seed)
    v, fs = _all_outside(rng, K, 10, logits, ties)
    N = v.shape[0]
    res = bracket_box_halfspace(v, fs.lower.expand(N, K), fs.upper.expand(N, K), fs.A.expand(N, 1, K)[:, 0],
                                fs.b.expand(N, 1)[:, 0], tol=1e-10)
    ok = res.certified
    assert float(ok.double().mean()) >= 0.8
    assert bool((res.kkt_residual[ok] <= 1e-10).all()) and bool((res.mu[ok] >= 0).all())
    assert torch.allclose(res.w[ok], reference.project(v, fs)[ok], atol=1e-6, rtol=0)


def test_rows_left_few_or_many_end_exact():
    """A few rows left by the kernel take the bracketing search, many take the kernel with more steps first; both
    end exact and OPTIMAL (the rows left checked against cvxpy)."""
    from solvers import projection
    K = 6
    v, fs = _all_outside(np.random.default_rng(11), K, 3000, logits=True)
    steps = dict(zip(("newton_steps", "path_steps", "newton_polish"), projection._FIXED_STEPS[1][1]))
    rest = (~_fast(v, fs, **steps).certified).nonzero()[:, 0]
    assert rest.numel() * K > projection._BRACKET_MAX_ELEMENTS >= 3 * K  # many
    for rows in (torch.arange(v.shape[0]), rest[:3]):  # many, then few
        w, info = project(v[rows], fs[rows], return_info=True)
        assert bool((info.status == int(Status.OPTIMAL)).all()) and bool((info.kkt_residual <= 1e-9).all())
        left = torch.isin(rows, rest)
        assert torch.allclose(w[left], reference.project(v[rows][left], fs[rows][left]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("logits", [False, True])
def test_shrinking_the_batch_keeps_the_points(logits):
    """``shrink_after``: the rows certified after that many Newton steps stop, the rest go on in a smaller batch;
    the same rows end certified, at the same points."""
    v, fs = _all_outside(np.random.default_rng(21), 16, 600, logits)
    full = _fast(v, fs, newton_steps=3, path_steps=0, newton_polish=8)
    shrunk = _fast(v, fs, newton_steps=3, path_steps=0, newton_polish=8, shrink_after=4)
    assert torch.equal(full.certified, shrunk.certified) and bool(full.certified.any())
    ok = full.certified
    assert torch.allclose(full.w[ok], shrunk.w[ok], atol=1e-12, rtol=0)
    assert torch.allclose(full.mu[ok], shrunk.mu[ok], atol=1e-9, rtol=1e-9)


def test_box_simplex_by_newton_steps_matches_the_breakpoint_search():
    """Box∩simplex eagerly: Newton steps certified at round-off, the breakpoint search on the rows they leave (far-off
    logits); they agree with the breakpoint search on every row, ties and one-point boxes included."""
    from solvers.parametric import _BOX_SIMPLEX_STEPS, _box_simplex_newton, _euclid_box_simplex_fast, _euclid_box_simplex_u
    rng = np.random.default_rng(17)
    for K in (1, 2, 5, 8, 16, 33):
        v = torch.tensor(np.concatenate([rng.normal(size=(200, K)) * 8, np.round(rng.normal(size=(50, K))),
                                         rng.dirichlet(np.ones(K), 100)]))
        lo = torch.tensor(rng.uniform(0, 0.5 / K, (350, K)) * (rng.uniform(size=(350, K)) < 0.5))
        hi = torch.maximum(lo, torch.tensor(np.where(rng.uniform(size=(350, K)) < 0.3, rng.uniform(min(1.2 / K, 1.0), 1, (350, K)), 1.0)))
        hi[:10] = lo[:10] + (1 - lo[:10].sum(-1, keepdim=True)) / K  # one-point boxes (Σ hi = 1)
        _, ok = _box_simplex_newton(v, lo, hi, _BOX_SIMPLEX_STEPS)
        assert bool(ok[250:].all())  # on the simplex: certified by the Newton steps alone
        assert K < 5 or not bool(ok.all())  # far-off logits: some rows take the breakpoint search
        w = _euclid_box_simplex_fast(v, lo, hi)  # (the breakpoint search's own round-off: up to ~3e-14 at K = 33)
        assert torch.allclose(w, _euclid_box_simplex_u(v, lo, hi)[0], atol=1e-13, rtol=0)
        assert float((w.sum(-1) - 1).abs().max()) <= 16 * K * 2.3e-16 and bool(((w >= lo) & (w <= hi)).all())


def test_degenerate_rows():
    K = 4
    base = FeasibleSet.simplex(K, dtype=F64).cap(0, 0.45).floor(1, 0.02)
    v = torch.tensor([[0.3, 0.3, 0.3, 0.1],  # ties
                      [0.25, 0.25, 0.25, 0.25],  # all tied
                      [0.45, 0.02, 0.33, 0.2],  # on the box boundary, on the row's boundary (b = a·v)
                      [0.1, 0.2, 0.3, 0.4],  # zero row a = 0 with b ≥ 0: inactive
                      [2.0, -1.0, 0.5, 0.5]], dtype=F64)  # one coordinate at the cap, another at its floor
    a = torch.tensor([[0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1], [0.3, 0.1, 0.0, 0.2], [0.0] * 4,
                      [0.0, 0.3, 0.3, 0.0]], dtype=F64)
    b = torch.tensor([0.1, 0.1, float((a[2] * v[2]).sum()), 0.0, 0.05], dtype=F64)
    fs = base.halfspace(a, b, name="u")
    res = _fast(v, fs)
    wr = reference.project(v, fs)
    assert bool(res.certified.all())
    assert torch.allclose(res.w, wr, atol=1e-6, rtol=0)
    # an empty row (a·w ≥ 0.3 on the simplex, b = 0.1): not certified; project relaxes it
    fs_e = base.halfspace(torch.tensor([0.3] * 4, dtype=F64), 0.1, name="empty").expand((1,))
    fs_e = FeasibleSet(fs_e.lower, fs_e.upper, torch.cat([fs_e.A, fs.A[:1]]), torch.cat([fs_e.b, fs.b[:1]]), ("u",))
    v2 = v[:2]
    assert not bool(_fast(v2, fs_e).certified[0])
    w, info = project(v2, fs_e, return_info=True)
    assert info.status.tolist() == [int(Status.RELAXED), int(Status.OPTIMAL)]
    assert torch.allclose(w, reference.project(v2, fs_e), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_solved_in_float32(dtype):
    """Issue 19: half-precision rows came back up to 0.275 off and violating while flagged OPTIMAL."""
    v, fs = _all_outside(np.random.default_rng(5), 8, 64)
    w, info = project(v.to(dtype), fs.to(dtype=dtype), return_info=True)
    w64 = project(v.to(dtype).double(), fs.to(dtype=dtype).to(dtype=F64))  # the same rounded data, exactly
    assert w.dtype == dtype and bool((info.status == int(Status.OPTIMAL)).all())
    assert float((w.double() - w64).abs().max()) <= 4 * torch.finfo(dtype).eps
    assert bool(fs.to(dtype=dtype).to(dtype=F64).contains(w64, tol=1e-9).all())


def test_fast_path_compiles_without_graph_breaks():
    torch._dynamo.reset()
    v, fs = _all_outside(np.random.default_rng(3), 8, 64)
    N, K = v.shape
    args = (v, fs.lower.expand(N, K), fs.upper.expand(N, K), fs.A[:, 0], fs.b[:, 0])
    # one step of each stage: every step of a stage runs the same code (tracing the default unrolled steps takes 15 s)
    explained = torch._dynamo.explain(project_box_halfspace)(*args, tol=1e-10, newton_steps=1, path_steps=1,
                                                             newton_polish=1)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_gradcheck_fast_path_rows():
    v, fs = _all_outside(np.random.default_rng(9), 5, 6)
    assert bool(_fast(v, fs).certified.all())
    v = v.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: project(x, fs), (v,), eps=1e-7, atol=1e-6)


def test_float32_rows_are_solved_in_float64():
    """float32 round-off inside the kernel moved ill-conditioned off-simplex rows by up to 0.8 (certified at the
    float32 tolerance); project runs it in float64 and agrees with the float64 projection of the same data."""
    v, fs = _all_outside(np.random.default_rng(1), 4, 2048, logits=True)
    v32, fs32 = v.float(), fs.to(dtype=torch.float32)
    w, info = project(v32, fs32, return_info=True)
    w64 = project(v32.double(), fs32.to(dtype=F64))
    assert w.dtype == torch.float32 and bool((info.status == int(Status.OPTIMAL)).all())
    assert float((w.double() - w64).abs().max()) <= 1e-5
