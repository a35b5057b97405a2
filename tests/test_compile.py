"""``solvers.project`` and ``SafeDistiller.targets`` inside ``torch.compile(fullgraph=True)`` (box∩simplex, caps,
floors and the per-token ``unsafe_mass`` row, a second row; or an ordinal chain, alone or with one row): zero graph
breaks, the eager results,
uncertified and relaxed rows flagged, counted after the graph and corrected; a CUDA graph of the step (skipped
without CUDA)."""
import math

import numpy as np
import pytest
import torch

import solvers.projection
from safekd import constraints as C
from safekd.distiller import SafeDistiller
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.targets.pipeline import projection_stats
from safekd.weighting import ConfidenceSoftmax, GoldLikelihood
from solvers import FeasibleSet, Status, project
from students import Student

F64 = torch.float64
NO_CHECKS = ChecksSpec(reference_every=0, alarm_window=0)


def _rows(rng: np.random.Generator, N: int, K: int, bound: tuple[float, float] = (0.0, 0.2)) -> FeasibleSet:
    """Cap, floor and one per-token row ``a·w ≤ b`` (some rows empty when ``b`` is small)."""
    fs = FeasibleSet.simplex(K, dtype=F64).cap(0, 0.45).floor(1, 0.02)
    return fs.halfspace(torch.tensor(rng.uniform(0, 0.3, (N, K))), torch.tensor(rng.uniform(*bound, N)), name="unsafe")


def _project_info(v, fset):
    return project(v, fset, return_info=True, on_all_empty="relax")


def _compiled(fn, backend="eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("K", [4, 16])
def test_project_has_no_graph_break_and_matches_eager(K):
    rng = np.random.default_rng(K)
    v = torch.softmax(torch.tensor(rng.normal(size=(32, K)) * 1.5), -1)
    fs = _rows(rng, 32, K)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_project_info)(v, fs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    w, info = _compiled(_project_info)(v, fs)
    w_e, info_e = _project_info(v, fs)
    assert bool((info_e.relaxation > 0).any())  # some rows are empty: relaxed in closed form inside the graph
    torch.testing.assert_close(w, w_e, rtol=0, atol=1e-12)
    assert torch.equal(info.status, info_e.status) and info.success == info_e.success
    assert info.message == info_e.message
    torch.testing.assert_close(info.relaxation, info_e.relaxation, rtol=0, atol=1e-15)
    inner = info_e.relaxation == 0  # on an empty row's vertex face the multiplier is not unique
    torch.testing.assert_close(info.multipliers[inner], info_e.multipliers[inner], rtol=0, atol=1e-10)
    box = FeasibleSet.simplex(K, dtype=F64).cap(0, 0.45).floor(1, 0.02)  # no row: the exact breakpoint search in
    # the graph, Newton steps certified at round-off eagerly
    torch.testing.assert_close(_compiled(_project_info)(v, box)[0], _project_info(v, box)[0], rtol=0, atol=1e-15)


def test_two_rows_have_no_graph_break_and_match_eager():
    """The per-token row and a group cap (two rows): the fixed-shape two-row kernel."""
    rng = np.random.default_rng(8)
    K, N = 5, 40
    fs = _rows(rng, N, K, (0.12, 0.2)).halfspace(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], dtype=F64), 0.3,
                                                  name="group")
    v = torch.softmax(torch.tensor(rng.normal(size=(N, K)) * 1.5), -1)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_project_info)(v, fs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    w, info = _compiled(_project_info)(v, fs)
    w_e, info_e = _project_info(v, fs)
    ok = info_e.status == int(Status.OPTIMAL)
    assert bool((info.status[ok] == int(Status.OPTIMAL)).all()) and bool(info_e.active[ok].all(-1).any())
    torch.testing.assert_close(w[ok], w_e[ok], rtol=0, atol=1e-10)
    # an empty set (both rows soft): eager relaxes it by an LP; inside a graph it is flagged NUMERICAL
    assert int((~ok).sum()) > 0 and bool((info.status[~ok] == int(Status.NUMERICAL)).all())
    assert bool((info_e.status[~ok] == int(Status.RELAXED)).all())


def test_chain_set_has_no_graph_break_and_matches_eager():
    """A safety order (``order_by``: K − 1 chain rows) with a cap and a floor: the fixed-shape chain kernel."""
    rng = np.random.default_rng(7)
    K, N = 6, 40
    scores = torch.tensor(rng.permutation(K), dtype=F64)
    fs = FeasibleSet.simplex(K, dtype=F64).cap(int(scores.argmin()), 0.3).floor(int(scores.argmax()), 0.2)
    fs = fs.order_by(scores)
    v = torch.cat([torch.softmax(torch.tensor(rng.normal(size=(N // 2, K)) * 1.5), -1),
                   torch.tensor(rng.normal(size=(N // 2, K)) * 2.0)])  # on and off the simplex
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_project_info)(v, fs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    w, info = _compiled(_project_info)(v, fs)
    w_e, info_e = _project_info(v, fs)
    assert bool((info.status == int(Status.OPTIMAL)).all()) and info.success
    torch.testing.assert_close(w, w_e, rtol=0, atol=1e-10)
    assert float(info.kkt_residual.max()) <= 1e-9


def test_chain_and_a_row_have_no_graph_break_and_match_eager():
    """A safety order and the per-token unsafe-mass row (K − 1 chain rows and one more): the fixed-shape chain kernel
    inside a safeguarded Newton search on the row's multiplier; rows it cannot certify (here the sets the row empties,
    which eager relaxes by an LP) are flagged NUMERICAL."""
    rng = np.random.default_rng(5)
    K, N = 5, 48
    scores = torch.tensor(rng.permutation(K), dtype=F64)
    fs = FeasibleSet.simplex(K, dtype=F64).cap(int(scores.argmin()), 0.35).floor(int(scores.argmax()), 0.1)
    a = torch.tensor(rng.uniform(0, 0.3, (N, K)))
    fs = fs.order_by(scores).halfspace(a, torch.tensor(rng.uniform(0.05, 0.2, N)), name="unsafe")
    v = torch.cat([torch.softmax(torch.tensor(rng.normal(size=(N // 2, K)) * 1.5), -1),
                   torch.tensor(rng.normal(size=(N // 2, K)) * 2.0)])  # on and off the simplex
    w, info = _compiled(_project_info)(v, fs)  # (fullgraph=True: a graph break would raise)
    w_e, info_e = _project_info(v, fs)
    ok = info.status == int(Status.OPTIMAL)
    assert bool((info_e.status[ok] == int(Status.OPTIMAL)).all()) and bool(info.active[ok, -1].any())
    torch.testing.assert_close(w[ok], w_e[ok], rtol=0, atol=1e-10)
    torch.testing.assert_close(info.multipliers[ok, -1], info_e.multipliers[ok, -1], rtol=0, atol=1e-7)  # (the
    assert float(info.kkt_residual[ok].max()) <= 1e-9  # chain's multipliers are not unique where its rows meet bounds)
    relaxed = info_e.status == int(Status.RELAXED)
    assert bool(relaxed.any()) and bool((info.status[relaxed] == int(Status.NUMERICAL)).all())
    assert float((~ok & ~relaxed).double().mean()) <= 0.05  # solvable rows left uncertified: few


@pytest.mark.slow
def test_project_with_inductor_matches_eager():
    """The default backend (inductor: ~55 s to compile the unrolled kernel steps on one shared CPU core)."""
    rng = np.random.default_rng(4)
    v = torch.softmax(torch.tensor(rng.normal(size=(32, 4)) * 1.5), -1)
    fs = _rows(rng, 32, 4)
    w, info = _compiled(_project_info, backend="inductor")(v, fs)
    w_e, info_e = _project_info(v, fs)
    torch.testing.assert_close(w, w_e, rtol=0, atol=1e-12)
    assert torch.equal(info.status, info_e.status)


def test_project_gradient_traces_and_matches_eager():
    rng = np.random.default_rng(5)
    v0 = torch.softmax(torch.tensor(rng.normal(size=(16, 4)) * 1.5), -1)
    fs, g = _rows(rng, 16, 4, (0.05, 0.2)), torch.tensor(rng.normal(size=(16, 4)))

    def grad(v):
        v = v.clone().requires_grad_(True)
        (project(v, fs) * g).sum().backward()
        return v.grad

    def loss(v):
        return (project(v, fs) * g).sum()

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(v0.clone().requires_grad_(True)).graph_break_count == 0
    v = v0.clone().requires_grad_(True)
    _compiled(loss)(v).backward()
    inner = _project_info(v0, fs)[1].relaxation == 0
    # on an empty row's relaxed set (a thin face) the eager active set leaves round-off that frees coordinates
    assert 0 < int(inner.sum()) < 16
    torch.testing.assert_close(v.grad[inner], grad(v0)[inner], rtol=0, atol=1e-12)


def test_uncertified_row_is_flagged_inside_the_graph():
    """A hard row that empties its set cannot be relaxed, nor reach the active set, inside a graph: the row keeps
    the kernel's iterate, flagged NUMERICAL, and is counted from the returned status after the graph."""
    K = 4
    fs = FeasibleSet.simplex(K, dtype=F64).halfspace(torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.4]],
                                                                   dtype=F64), torch.tensor([0.3, 0.3], dtype=F64),
                                                      name="hard", hard=True)
    v = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=F64)  # row 0: min a·w = 0.5 > 0.3
    w, info = _compiled(_project_info)(v, fs)
    assert info.status.tolist() == [int(Status.NUMERICAL), int(Status.OPTIMAL)]
    assert int((info.status == int(Status.NUMERICAL)).sum()) == 1 and not info.success
    assert "NUMERICAL" in info.message and float(info.kkt_residual[0]) > 1e-10
    torch.testing.assert_close(w[1], _project_info(v[1:], fs[1:])[0][0], rtol=0, atol=1e-12)
    assert float((w[0].sum() - 1).abs()) < 1e-12 and bool((w[0] >= 0).all())


def test_all_empty_set_fails_a_device_side_assert():
    fs = FeasibleSet.simplex(3, dtype=F64).halfspace(torch.tensor([0.5, 0.6, 0.7], dtype=F64), 0.1, name="u")
    with pytest.raises(RuntimeError, match="empty in every row"):
        _compiled(lambda v: project(v, fs))(torch.full((4, 3), 1 / 3, dtype=F64))
    with pytest.raises(RuntimeError, match="NaN or inf"):
        _compiled(lambda v: project(v, fs, on_all_empty="relax"))(torch.full((4, 3), math.nan, dtype=F64))


# ---------------------------------------------------------------------------------------------- SafeDistiller


def _distiller(eps: float | None, weighting, V=12, B=2, T=16, device="cpu", dtype=F64, extra=()):
    """Cap, floor and ``unsafe_mass(eps)``, or (``eps=None``) the safety order instead of the unsafe-mass row;
    ``extra`` constraints after those."""
    g = torch.Generator().manual_seed(0)
    row = C.safety_order() if eps is None else C.unsafe_mass(eps)
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=[C.cap("risky", 0.2), C.floor("safe", 0.1), row, *extra, C.unsafe_rate(0.05)],
                unsafe=[0, 1], dual=DualSpec(lr=0.1), checks=NO_CHECKS)
    torch.manual_seed(0)
    student = Student(V).to(device, dtype)
    batch = {"inputs": torch.randint(0, V, (B, T), generator=g).to(device),
             "teacher_logits": (2 * torch.randn(B, T, 3, V, generator=g, dtype=F64)).to(device, dtype),
             "labels": torch.randint(0, V, (B, T), generator=g).to(device),
             "mask": torch.ones(B, T, dtype=torch.bool, device=device)}
    batch["mask"][1, 10:] = False
    d = SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1), spec, weighting=weighting)
    return d, batch


def _targets(d):
    def fn(batch):
        return d.targets(batch)
    return fn


def _compiled_targets_match_eager(d, batch, atol):
    """``d.targets`` traces with no graph break and, compiled, gives the eager weights and pooled targets to
    ``atol``; returns ``(compiled, eager)``."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_targets(d))(batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    t, e = _compiled(_targets(d))(batch), d.targets(batch)
    torch.testing.assert_close(t.weights, e.weights, rtol=0, atol=atol)
    torch.testing.assert_close(t.target_logp, e.target_logp, rtol=0, atol=atol)
    return t, e


def test_targets_with_a_safety_order_have_no_graph_break_and_match_eager():
    d, batch = _distiller(None, ConfidenceSoftmax(beta=3.0))
    t, _ = _compiled_targets_match_eager(d, batch, 1e-10)
    w = t.weights[batch["mask"]]  # safe ≥ mid ≥ risky on every token
    assert bool((w[..., 0] >= w[..., 1] - 1e-12).all()) and bool((w[..., 1] >= w[..., 2] - 1e-12).all())


def test_targets_with_a_safety_order_and_unsafe_mass_have_no_graph_break_and_match_eager():
    """The flagship spec: caps and floors, ``safety_order`` and ``unsafe_mass`` together (a chain and one row)."""
    d, batch = _distiller(0.5, ConfidenceSoftmax(beta=3.0), extra=(C.safety_order(),))
    t, _ = _compiled_targets_match_eager(d, batch, 1e-10)
    stats = projection_stats(t.projection)
    assert stats["uncertified_tokens"] == 0 and stats["active"]["unsafe_mass"] > 0
    w = t.weights[batch["mask"]]
    assert bool((w[..., 0] >= w[..., 1] - 1e-12).all()) and bool((w[..., 1] >= w[..., 2] - 1e-12).all())


def test_targets_with_a_group_cap_have_no_graph_break_and_match_eager():
    """``unsafe_mass`` and a group cap: two rows per token. Where they empty a token's set (ε = 0.3 here) eager
    relaxes it by an LP; the graph flags it uncertified and corrects its target, so ``q(U) ≤ ε`` still holds."""
    group = (C.group_cap(["mid", "risky"], 0.45),)
    d, batch = _distiller(0.5, ConfidenceSoftmax(beta=3.0), extra=group)
    t, _ = _compiled_targets_match_eager(d, batch, 1e-10)
    stats = projection_stats(t.projection)
    assert stats["uncertified_tokens"] == 0 and stats["active"]["unsafe_mass"] > 0
    w = t.weights[batch["mask"]]
    assert bool((w[..., 1:].sum(-1) <= 0.45 + 1e-10).all())
    d, batch = _distiller(0.3, ConfidenceSoftmax(beta=3.0), extra=group)
    t = _compiled(_targets(d))(batch)
    stats = projection_stats(t.projection)
    assert stats["uncertified_tokens"] == 1 and stats["corrected_tokens"] >= 1
    assert bool((_unsafe_mass(t.target_logp)[batch["mask"]] <= 0.3 + 1e-9).all())


def _unsafe_mass(logq):
    return logq[..., :2].exp().sum(-1)


@pytest.mark.parametrize("weighting", [None, ConfidenceSoftmax(beta=3.0), GoldLikelihood()],
                         ids=["uniform", "confidence", "gold"])
def test_targets_have_no_graph_break_and_match_eager(weighting):
    d, batch = _distiller(0.12, weighting)  # ε = 0.12: some tokens' sets are empty (relaxed, corrected)
    t, e = _compiled_targets_match_eager(d, batch, 1e-12)
    assert torch.equal(t.relaxed, e.relaxed) and torch.equal(t.corrected, e.corrected)
    assert int(e.relaxed.sum()) > 0 and int(e.corrected.sum()) > 0
    stats = projection_stats(t.projection)  # counted after the graph, as the eager path counts
    act, eager = stats.pop("active"), dict(e.projection)
    act_e = eager.pop("active")
    # the graph retries every row with more kernel steps, eager only the rows left (by bracketing when few): their
    # certified points agree within round-off
    assert stats.pop("max_kkt_residual") <= 1e-12 and eager.pop("max_kkt_residual") <= 1e-12
    assert stats == eager
    # bounds active at an empty row's vertex: the graph's point is exactly at them, the active set's within round-off
    assert all(abs(act.get(k, 0) - act_e.get(k, 0)) <= int(e.relaxed.sum()) for k in act | act_e)
    assert float(_unsafe_mass(t.target_logp)[t.relaxed].max()) <= 0.12 * (1 + 1e-6)


def test_uncertified_tokens_are_corrected_like_relaxed_ones(monkeypatch):
    """With no kernel steps most tokens outside their set stay uncertified in the graph: they count as relaxed
    (``uncertified_tokens``) and their pooled target is corrected to q(U) ≤ ε."""
    monkeypatch.setattr(solvers.projection, "_FIXED_STEPS", ((math.inf, (0, 0, 0)),))
    monkeypatch.setattr(solvers.projection, "_FIXED_STEPS_RETRY", (0, 0, 0))
    d, batch = _distiller(0.3, ConfidenceSoftmax(beta=3.0))
    t = _compiled(_targets(d))(batch)
    stats = projection_stats(t.projection)
    assert stats["uncertified_tokens"] > 0 and stats["relaxed_tokens"] >= stats["uncertified_tokens"]
    assert stats["relaxed_tokens"] == int(t.relaxed.sum()) and bool((t.relaxed <= t.mask).all())
    assert float(_unsafe_mass(t.target_logp)[t.relaxed].max()) <= 0.3 * (1 + 1e-6)
    assert stats["corrected_tokens"] == int(t.corrected.sum()) > 0


def test_step_record_reads_compiled_targets():
    """A step finished on compiled targets: the record and the run's counters read their tensor statistics after
    the graph (as Python numbers)."""
    d, batch = _distiller(0.12, ConfidenceSoftmax(beta=3.0))
    t = _compiled(_targets(d))(batch)
    assert isinstance(t.projection["relaxed_tokens"], torch.Tensor)
    loss, pending = d.loss(batch)
    loss.backward()
    d.optimizer.step()
    pending.targets = t
    rec = d.finish_step(pending)
    assert rec.projection == projection_stats(t.projection) and rec.projection["relaxed_tokens"] > 0
    assert type(rec.projection["relaxed_tokens"]) is int and type(rec.projection["max_kkt_residual"]) is float
    assert d.events["relaxed_tokens"] == int(t.relaxed.sum()) and d.events["corrected_tokens"] == int(t.corrected.sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_captures_in_a_cuda_graph():
    """Compiled targets + KD loss + backward of a tiny student, captured in one CUDA graph and replayed: the same
    gradients as the eager step on the same batch."""
    d, batch = _distiller(0.12, ConfidenceSoftmax(beta=3.0), device="cuda", dtype=torch.float32)
    targets = torch.compile(_targets(d), fullgraph=True)
    params = list(d.student.parameters())

    def step():
        t = targets(batch)
        logp = torch.log_softmax(d.student(batch["inputs"]), -1)
        m = t.mask.to(logp.dtype)
        kd = ((t.target_logp.exp() * (t.target_logp - logp)).sum(-1) * m).sum() / m.sum()
        kd.backward()
        return kd.detach(), t.relaxed.sum(), t.projection["uncertified_tokens"]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) off the capture
        for _ in range(3):
            d.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = [p.grad.clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    d.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        kd, relaxed, uncertified = step()
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for p, g in zip(params, eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    e = d.targets(batch)
    assert int(relaxed) == int(e.relaxed.sum()) and int(uncertified) == 0 and math.isfinite(float(kd))
