"""The closed forms on an ordinal chain: enumeration of block structures (solvers.ordered), the exact least
relaxation of a chain-constrained row, and the chain point as a warm start of the active-set method."""
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solvers import FeasibleSet, Status, project, reference
from solvers import projection as P
from solvers.active_set import solve_active_set
from solvers.diagnosis import least_uniform_relaxation
from solvers.ordered import project_ordered_halfspace

F64 = torch.float64


def _ordered_set(K: int, a: torch.Tensor, beta: torch.Tensor) -> FeasibleSet:
    """{Σx = 1, x ≥ 0, x_1 ≥ … ≥ x_K, a·x ≤ β} per row (chain in coordinate order)."""
    return FeasibleSet.simplex(K, dtype=F64).order_by(torch.arange(K, 0, -1, dtype=F64), hard=True) \
        .halfspace(a, beta, name="u")


def _kkt_residual(v, a, x, lam, mu):
    """max |x − P_box∩Δ(v − λa − Σ_k μ_k (e_{k+1} − e_k))| with the multipliers returned."""
    shift = lam[:, None] * a
    shift[:, 1:] += mu
    shift[:, :-1] -= mu
    return float((P._euclid_box_simplex(v - shift, torch.zeros_like(v), torch.ones_like(v)) - x).abs().max())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 6), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       ties=st.booleans(), cut=st.sampled_from([0.0, 0.3, 1.0]))
def test_enumeration_matches_cvxpy(seed, K, scale, ties, cut):
    """Rows whose chain point violates the row (so it is active); ``cut = 0``: the row relaxed to the least value
    over the ordered simplex, one feasible point; ties in ``v`` and in ``a`` give equal blocks and flat ``g``."""
    rng = np.random.default_rng(seed)
    N = 8
    v = rng.normal(size=(N, K)) * scale
    a = rng.uniform(0, 1, (N, K))
    if ties:
        v, a = np.round(v, 0), np.round(a, 1)
    v, a = torch.tensor(v), torch.tensor(a)
    cs = a.cumsum(-1) / torch.arange(1, K + 1, dtype=F64)
    lowest = cs.amin(-1)  # min over the ordered simplex of a·x: the least prefix mean
    x_c = P._chain_point(v, torch.arange(K).expand(N, K), torch.ones(N, K - 1, dtype=torch.bool))[0]
    beta = lowest + cut * ((a * x_c).sum(-1) - lowest)
    keep = (a * x_c).sum(-1) > beta + 1e-9  # the row must be violated at the chain point
    if not bool(keep.any()):
        return
    v, a, beta = v[keep], a[keep], beta[keep]
    x, lam, mu, found = project_ordered_halfspace(v, a, beta, 1e-10)
    assert bool(found.all())
    assert bool((lam >= 0).all()) and bool((mu >= 0).all())
    assert _kkt_residual(v, a, x, lam, mu) <= 1e-9 * (1 + float(v.abs().max()))
    assert torch.allclose(x, reference.project(v, _ordered_set(K, a, beta)), atol=1e-6)


def test_enumeration_hits_blocks_zero_tails_and_single_points():
    v = torch.tensor([[0.1, 0.5, 0.2, -0.3],    # blocks: x0 = x1 pooled
                      [3.0, 0.0, 0.0, -2.0],    # zero tail
                      [0.4, 0.3, 0.2, 0.1]], dtype=F64)
    a = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.9, 0.1, 0.3, 0.2], [0.2, 0.4, 0.6, 0.8]], dtype=F64)
    beta = torch.tensor([0.4, 0.5, 0.2], dtype=F64)  # row 2: 0.2 = min prefix mean of a: x = e_0 only
    x, lam, mu, found = project_ordered_halfspace(v, a, beta, 1e-10)
    assert bool(found.all())
    assert torch.allclose(x, reference.project(v, _ordered_set(4, a, beta)), atol=1e-7)
    assert torch.allclose(x[2], torch.tensor([1.0, 0, 0, 0], dtype=F64))
    assert float(x[1, -1]) == 0.0 and _kkt_residual(v, a, x, lam, mu) <= 1e-12


def test_enumeration_reports_an_empty_set():
    v = torch.tensor([[0.7, 0.2, 0.1]], dtype=F64)
    a = torch.tensor([[1.0, 1.0, 1.0]], dtype=F64)
    _, _, _, found = project_ordered_halfspace(v, a, torch.tensor([0.5], dtype=F64), 1e-10)
    assert not bool(found[0])  # a·x = 1 on the simplex: ≤ 0.5 is empty


def _safekd_like_set(rng: np.random.Generator, N: int, K: int = 4, floor: float = 0.0) -> FeasibleSet:
    """The teacher-weight set of a safekd step: a cap, a hard safety order and a soft per-token unsafe-mass row."""
    fs = FeasibleSet.simplex(K, dtype=F64).cap(K - 1, 0.3, name="cap")
    if floor:
        fs = fs.floor(K - 1, floor, name="floor")
    fs = fs.order_by(torch.arange(K, 0, -1, dtype=F64), name="order", hard=True)
    a = torch.tensor(rng.uniform(0, 0.2, (N, K)))
    return fs.halfspace(a, torch.full((N,), 0.06, dtype=F64), name="unsafe_mass")


def test_least_relaxation_in_closed_form_on_the_chain(monkeypatch):
    """Empty rows of chain + one soft row: t* = (least prefix mean of a) − b, no LP, no active-set step, and the
    same t* as the LP; where a floor cuts the chain's vertices the certificate fails and the LP decides."""
    rng = np.random.default_rng(0)
    N = 64
    fs = _safekd_like_set(rng, N)
    v = torch.tensor(rng.dirichlet(np.ones(4), N))
    lp_calls = []
    real_lp = P._relax_rows_lp
    monkeypatch.setattr(P, "_relax_rows_lp", lambda *a: lp_calls.append(a[0].shape[0]) or real_lp(*a))
    w, info = project(v, fs, return_info=True, on_all_empty="relax")
    relaxed = info.relaxation > 0
    assert 5 <= int(relaxed.sum()) < N and not lp_calls and bool((info.iterations == 0).all())
    t_lp, _ = least_uniform_relaxation(*(x.numpy() for x in (fs.lower.expand(N, 4), fs.upper.expand(N, 4), fs.A, fs.b)),
                                       hard=np.array(fs.hard_rows))
    assert np.abs(info.relaxation.numpy() - np.maximum(t_lp, 0)).max() <= 1e-9
    assert bool((info.status[relaxed] == int(Status.RELAXED)).all())
    # a floor on the last teacher removes the prefix vertices that leave it at 0: the LP decides there
    fs_f = _safekd_like_set(np.random.default_rng(0), N, floor=0.1)
    w_f, info_f = project(v, fs_f, return_info=True, on_all_empty="relax")
    assert lp_calls
    t_f, _ = least_uniform_relaxation(*(x.numpy() for x in (fs_f.lower.expand(N, 4), fs_f.upper.expand(N, 4), fs_f.A,
                                                              fs_f.b)), hard=np.array(fs_f.hard_rows))
    assert np.abs(info_f.relaxation.numpy() - np.maximum(t_f, 0)).max() <= 1e-9
    for ws, inf, s in ((w, info, fs), (w_f, info_f, fs_f)):
        rows = torch.tensor(s.hard_rows) == 0
        b = s.b + inf.relaxation[:, None] * rows.to(F64)
        ref = reference.project(v, FeasibleSet(s.lower, s.upper, s.A, b, s.row_names, hard_rows=s.hard_rows))
        assert torch.allclose(ws, ref, atol=1e-6)


def test_chain_point_warm_starts_the_active_set():
    """GI from the chain point (chain rows active with the isotonic multipliers; a zero tail pinned by its chain rows
    and its last bound) reaches the same point as from the box∩simplex projection, in fewer steps."""
    rng = np.random.default_rng(1)
    N, K = 32, 7
    fs = _safekd_like_set(rng, N, K=K)
    v = torch.tensor(rng.dirichlet(np.ones(K), N)) + torch.tensor(rng.normal(0, 0.05, (N, K)))
    lo, hi, A, b = fs.lower.expand(N, K), fs.upper.expand(N, K), fs.A, fs.b.clone()
    b[:, -1] = torch.maximum(b[:, -1], (A[:, -1].cumsum(-1) / torch.arange(1, K + 1)).amin(-1) + 0.01)  # non-empty
    w, u = P._euclid_box_simplex_u(v, lo, hi)
    cold = solve_active_set(lo, hi, A, b, w, u, max_iter=100)
    perm, links = torch.arange(K).expand(N, K), torch.ones(N, K - 1, dtype=torch.bool)
    x0, u0, mu_chain, _ = P._chain_point(v, perm, links)
    mu0 = torch.zeros(N, A.shape[1], dtype=F64)
    mu0[:, :K - 1] = mu_chain
    x0, u0, mu0, valid = P._warm_start(x0, u0, mu0, perm, links, lo, hi, 0, 1e-10)
    tails = (x0[:, 1:] <= 0) & (x0[:, :-1] <= 0)
    assert bool(valid.all()) and bool(tails.any())  # zero tails of length ≥ 2 occur and are valid starts
    warm = solve_active_set(lo, hi, A, b, x0, u0, max_iter=100, mu0=mu0)
    assert bool(cold.converged.all()) and bool(warm.converged.all())
    assert torch.allclose(warm.x, cold.x, atol=1e-12)
    assert 2 * int(warm.iterations.sum()) < int(cold.iterations.sum())
    # without the tail rewrite the same start is invalid (dependent active normals) wherever a tail has an active row
    split = links.clone()
    split[:, 0] = False
    assert not bool(P._warm_start(*P._chain_point(v, perm, split)[:2], mu0, perm, split, lo, hi, 0, 1e-10)[3].all())
