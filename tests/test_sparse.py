"""Sparse (top-k) teachers: k = V is the dense path exactly; with k ≪ V the unsafe mass stays exact."""
import functools

import pytest
import torch

from safekd import constraints as C
from safekd.distiller import SafeDistiller
from safekd.divergences import generalized_jsd, reverse_kl, tvd
from safekd.pooling import geometric_pool, linear_pool
from safekd.sparse import SparseTeachers, topk_logprobs
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.unsafe import UnsafeSet
from safekd.weighting import GoldLikelihood
from students import Student

NO_CHECKS = ChecksSpec(reference_every=0, alarm_window=0)
U = [0, 1, 5]


def _batch(B=2, T=6, K=3, V=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, K, V, generator=g, dtype=torch.float64)
    logits[..., 2, :2] += 4.0  # the risky teacher likes the unsafe tokens
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    return {"inputs": torch.randint(0, V, (B, T), generator=g), "labels": labels,
            "mask": labels != -100}, logits


def _distiller(V=12, temperature=1.0, constraints=None, **kw):
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=constraints if constraints is not None else
                [C.unsafe_mass(0.05), C.cap("risky", 0.6), C.unsafe_rate(0.3)],
                unsafe=U, temperature=temperature, dual=DualSpec(lr=0.1), checks=NO_CHECKS)
    torch.manual_seed(0)
    student = Student(V).double()
    return SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1), spec, **kw), student


def _sparse(batch, logits, k):
    return {**batch, **topk_logprobs(logits, k, UnsafeSet(U))}


@pytest.mark.parametrize("divergence,temperature", [
    (None, 1.0), (functools.partial(reverse_kl, validate_args=False), 1.0), (generalized_jsd, 2.0), (tvd, 1.0),
    (functools.partial(generalized_jsd, beta=0.3), 1.5)])
def test_k_equal_v_is_the_dense_path(divergence, temperature) -> None:
    batch, logits = _batch()
    kw = {"weighting": GoldLikelihood(beta=1.0, epsilon=0.1)}
    if divergence is not None:
        kw["divergence"] = divergence
    out = {}
    for name, b in (("dense", {**batch, "teacher_logits": logits}), ("sparse", _sparse(batch, logits, 12))):
        d, student = _distiller(temperature=temperature, **kw)
        t = d.targets(b)
        loss, pending = d.loss(b)
        loss.backward()
        out[name] = (t, loss.detach(), [p.grad.clone() for p in student.parameters()], pending)
    (td, ld, gd, pd), (ts, ls, gs, ps) = out["dense"], out["sparse"]
    assert ts.sparse is not None and td.sparse is None
    torch.testing.assert_close(ts.weights, td.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(ts.target_logp, td.target_logp, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ts.teacher_logp, td.teacher_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ls, ld, rtol=1e-10, atol=1e-12)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert pd.targets.projection["projected_tokens"] == ps.targets.projection["projected_tokens"] > 0


def test_geometric_pool_on_buckets_is_the_pool_of_the_uniform_tail_teachers() -> None:
    batch, logits = _batch(V=40)
    sp = SparseTeachers.from_batch(_sparse(batch, logits, 4), 3)
    b = sp.buckets(40, UnsafeSet(U), torch.float64)
    w = torch.softmax(torch.randn(2, 6, 3, dtype=torch.float64), -1)
    for pool in (linear_pool, geometric_pool):
        torch.testing.assert_close(b.expand(pool(b.teacher_logp, w)), pool(b.expand(b.teacher_logp), w),
                                   rtol=0, atol=1e-12)


def test_unsafe_mass_is_exact_with_k_much_smaller_than_v() -> None:
    V, k, eps = 200, 3, 0.02
    batch, logits = _batch(V=V)
    logits[..., 2, :2] += 6.0
    d, _ = _distiller(V=V, constraints=[C.unsafe_mass(eps)])
    t = d.targets(_sparse(batch, logits, k))
    p_u = UnsafeSet(U).mass(torch.log_softmax(logits, -1), teacher_axis=True)      # from the full logits
    lp, top = torch.log_softmax(logits, -1), logits.topk(k, -1).indices
    top_only = (lp.gather(-1, top).exp() * torch.isin(top, torch.tensor(U))).sum(-1)
    assert float((p_u - top_only).max()) > eps  # a top-k sum misses more unsafe mass than the whole budget
    pooled = (t.weights * p_u).sum(-1)[t.mask]
    assert float((pooled - eps).max()) <= 1e-9
    assert t.projection["projected_tokens"] > 0
    # the pooled target (dense uniform-tail view) carries exactly that unsafe mass
    torch.testing.assert_close(UnsafeSet(U).mass(t.target_logp)[t.mask], pooled, rtol=0, atol=1e-12)
    torch.testing.assert_close(t.target_logp.exp().sum(-1), torch.ones(2, 6, dtype=torch.float64))


def test_relaxed_tokens_are_corrected_exactly_on_buckets() -> None:
    V, eps = 60, 0.01
    batch, logits = _batch(V=V)
    logits[..., :, :2] += 8.0  # every teacher is unsafe: the unsafe row conflicts with the floor
    d, _ = _distiller(V=V, constraints=[C.unsafe_mass(eps)])
    t = d.targets(_sparse(batch, logits, 4))
    assert bool(t.corrected.any())
    mass = UnsafeSet(U).mass(t.target_logp)
    assert float(mass[t.corrected].max()) <= eps * (1 + 1e-9)


def test_sparse_batch_errors_name_the_key() -> None:
    batch, logits = _batch()
    d, _ = _distiller()
    sp = _sparse(batch, logits, 4)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        d.targets({**sp, "teacher_topk_logprobs": sp["teacher_topk_logprobs"][..., :2]})
    with pytest.raises(ValueError, match="teacher_unsafe_mass"):
        d.targets({k: v for k, v in sp.items() if k != "teacher_unsafe_mass"})
    with pytest.raises(ValueError, match="K=3"):
        d.targets({**sp, "teacher_topk_ids": sp["teacher_topk_ids"][..., :2, :],
                   "teacher_topk_logprobs": sp["teacher_topk_logprobs"][..., :2, :]})
    with pytest.raises(ValueError, match="out of range"):
        d.targets({**sp, "teacher_topk_ids": sp["teacher_topk_ids"] + 100})


def test_a_weighting_operator_comparing_student_and_teachers_is_refused_on_a_sparse_cache() -> None:
    from safekd.weighting import AEKD

    batch, logits = _batch()
    d, student = _distiller(weighting={"token": AEKD()})
    before = [p.clone() for p in student.parameters()]
    with pytest.raises(ValueError, match="AEKD .*dense teacher logits"):
        d.step(_sparse(batch, logits, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    d.step({**batch, "teacher_logits": logits})  # dense teachers: fine

def test_student_buckets_and_their_gradient_match_the_full_softmax() -> None:
    V, k, u = 40, 3, list(range(0, 40, 4))
    batch, logits = _batch(V=V)
    b = SparseTeachers.from_batch(topk_logprobs(logits, k, UnsafeSet(u)), 3).buckets(V, UnsafeSet(u), torch.float64)
    z = torch.randn(2, 6, V, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, b.log_count.shape[-1], dtype=torch.float64)
    got = b.student_logp(z)
    (torch.where(got > -torch.inf, got, 0.0) * g).sum().backward()
    grad = z.grad.clone()
    z.grad = None
    lp = torch.log_softmax(z, -1)
    in_s = torch.zeros(2, 6, V, dtype=torch.bool).scatter(-1, b.support, True)
    in_u = torch.zeros(V, dtype=torch.bool)
    in_u[u] = True
    ref = torch.cat([lp.gather(-1, b.support).masked_fill(~b.valid, -torch.inf),
                     torch.logsumexp(lp.masked_fill(in_s | ~in_u, -torch.inf), -1, keepdim=True),
                     torch.logsumexp(lp.masked_fill(in_s | in_u, -torch.inf), -1, keepdim=True)], -1)
    assert bool((b.log_count[..., -2] > -torch.inf).all())  # U ∖ S is not empty: the fused U term is exercised
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    (torch.where(ref > -torch.inf, ref, 0.0) * g).sum().backward()
    torch.testing.assert_close(grad, z.grad, rtol=1e-8, atol=1e-12)


def test_rounded_top_k_never_exceeds_the_exact_unsafe_budget() -> None:
    V = 50
    batch, logits = _batch(V=V)
    sp = _sparse(batch, logits, 4)
    sp["teacher_topk_logprobs"] = sp["teacher_topk_logprobs"].to(torch.bfloat16)  # ~0.4% rounding
    b = SparseTeachers.from_batch(sp, 3).buckets(V, UnsafeSet(U), torch.float64)
    full = b.expand(b.teacher_logp)
    p_u = UnsafeSet(U).mass(torch.log_softmax(logits, -1), teacher_axis=True)
    torch.testing.assert_close(UnsafeSet(U).mass(full, teacher_axis=True), p_u, rtol=0, atol=1e-12)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones_like(p_u), rtol=0, atol=1e-12)


def test_audit_of_a_sparse_cache_reads_buckets_and_equals_the_dense_audit_when_k_is_v() -> None:
    """The audit reads a top-k cache through the bucket view (no [..., K, V] tensor); at k = V it is the dense
    audit: the same estimates and bounds for every constraint, the same teacher weights."""
    from safekd import audit

    batch, logits = _batch(B=8, T=6)
    d, student = _distiller(constraints=[C.unsafe_mass(0.05), C.cap("risky", 0.6), C.unsafe_rate(0.3),
                                         C.retain("target_agreement", 0.0)])
    dense = audit(student, {**batch, "teacher_logits": logits}, d.spec, seed=0, distiller=d)
    sparse = audit(student, _sparse(batch, logits, 12), d.spec, seed=0, distiller=d)
    for a, b in zip(dense.constraints, sparse.constraints):
        assert a.name == b.name and a.estimate == pytest.approx(b.estimate, abs=1e-9)
        assert a.bound == pytest.approx(b.bound, abs=1e-9)
    t = d.targets(_sparse(batch, logits, 4), expand=False)
    assert t.sparse is not None and t.teacher_logp.shape[-1] == t.sparse.buckets.teacher_logp.shape[-1]
    assert t.target_logp.shape[-1] == 12  # target_agreement reads the dense target: expanded for it alone
    # at k < V the bucket view's pooled-target unsafe mass is the dense view's: the worst token in the report
    sp = _sparse(batch, logits, 4)
    d, student = _distiller()  # no constraint reads the dense target: the audit keeps the bucket view
    report = audit(student, sp, d.spec, seed=0, distiller=d)
    assert d.targets(sp, expand=False).target_logp.shape[-1] != 12
    dense_t = d.targets(sp)  # expand=True: the dense [..., V] view
    q_u = UnsafeSet(U).mass(dense_t.target_logp)[dense_t.mask]
    assert report.constraint("unsafe_mass").estimate == pytest.approx(float(q_u.max()), abs=1e-9)
