"""Constraint values: sign convention, validation, teacher-weight compilation, per-batch measurement."""
import pytest
import torch

import solvers
from safekd import constraints as C
from safekd.unsafe import UnsafeSet


def test_residual_sign_convention_and_truth_value():
    c = C.unsafe_rate(0.1)
    assert c.sense == "<=" and c.residual(0.25) == pytest.approx(0.15) and not c.satisfied(0.25)
    r = C.retain("accuracy", 0.8)
    assert r.sense == ">=" and r.residual(0.7) == pytest.approx(0.1) and r.satisfied(0.9)
    with pytest.raises(TypeError, match="ambiguous"):
        bool(c)
    with pytest.raises(ValueError, match="strict inequalities"):
        C.metric(lambda z, b: z.mean(), "<", 0.0)
    with pytest.raises(ValueError, match=r"`max` must be in \[0, 1\]"):
        C.cap("a", 1.5)
    with pytest.raises(ValueError, match="retain metric 'f1'"):
        C.retain("f1", 0.5)


def test_unsafe_set_ids_and_callable_agree():
    logp = torch.log_softmax(torch.randn(2, 5, 7, dtype=torch.float64), -1)
    ids = UnsafeSet([1, 4])
    fn = UnsafeSet(fn=lambda batch, V: torch.arange(V).remainder(3) == 1)  # {1, 4}
    expect = logp.exp()[..., [1, 4]].sum(-1)
    torch.testing.assert_close(ids.mass(logp), expect)
    torch.testing.assert_close(fn.mass(logp), expect)
    with pytest.raises(ValueError, match="out of range for vocabulary size 7"):
        UnsafeSet([9]).mass(logp)


def test_teacher_weight_constraints_compile_to_feasible_set():
    index = {"a": 0, "b": 1, "c": 2}
    fs = solvers.FeasibleSet.simplex(3, dtype=torch.float64)
    for c in (C.cap("c", 0.2), C.floor("a", 0.3), C.group_cap(["b", "c"], 0.5),
              C.safety_order({"a": 3.0, "b": 2.0, "c": 1.0})):
        fs = c.apply_static(fs, index, None)
    inside = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]], dtype=torch.float64)
    outside = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.4, 0.3], [0.45, 0.25, 0.3]], dtype=torch.float64)
    assert fs.contains(inside).all() and not fs.contains(outside).any()
    assert "cap(c)" in fs.upper_names and "floor(a)" in fs.lower_names


def test_per_token_rows_unsafe_mass_and_exclude():
    K, V = 3, 6
    lp = torch.log_softmax(torch.randn(2, 4, K, V, dtype=torch.float64), -1)
    ctx = C.MeasureContext(student_logits=None, batch={"task_ids": torch.tensor([0, 1])}, teacher_logprobs=lp,
                           teacher_index={"a": 0, "b": 1, "c": 2}, unsafe=UnsafeSet([0, 5]))
    sel = torch.ones(2, 4, dtype=torch.bool)
    sel[0, 0] = False
    a, b = C.unsafe_mass(0.1).token_rows(ctx, sel)
    torch.testing.assert_close(a, lp.exp()[..., [0, 5]].sum(-1)[sel])
    assert a.shape == (7, 3) and torch.all(b == 0.1)
    a, b = C.exclude("b", {"task_ids": [1]}).token_rows(ctx, sel)
    assert torch.equal(a[:, 1], torch.ones(7, dtype=torch.float64))
    assert b.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # sequence 1 (task 1) excludes teacher b


def test_student_measurement_is_sums_and_counts():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    labels = torch.tensor([[0, 1, 2], [3, 4, 0]])
    batch = {"mask": mask, "labels": labels, "task_ids": torch.tensor([0, 1])}
    p = logits.softmax(-1)
    m = C.unsafe_rate(0.1, unsafe=[1, 2]).measure_batch(logits, batch)
    assert float(m.count) == 3
    torch.testing.assert_close(m.value_sum, p[..., [1, 2]].sum(-1)[mask].sum().detach())
    m.proxy_sum.backward()
    assert logits.grad is not None and logits.grad[~mask].abs().max() == 0  # masked tokens get no gradient

    acc = C.retain("accuracy", 0.5).measure_batch(logits.detach(), batch)
    assert float(acc.value_sum) == float(((p.argmax(-1) == labels) & mask).sum())

    t_lp = torch.log_softmax(torch.randn(2, 3, 2, 5, dtype=torch.float64), -1)
    kl = C.kl_to("b", 1.0, on={"task_ids": [1]}).measure_batch(logits.detach(), batch, teacher_logprobs=t_lp,
                                                                teacher_names=["a", "b"])
    ref = (t_lp[1, 0, 1].exp() * (t_lp[1, 0, 1] - p[1, 0].log())).sum()
    assert float(kl.count) == 1 and torch.allclose(kl.value_sum, ref)
    with pytest.raises(ValueError, match=r"unknown teacher 'z'|names teacher 'z'"):
        C.kl_to("z", 1.0).measure_batch(logits.detach(), batch, teacher_logprobs=t_lp, teacher_names=["a", "b"])


def test_metric_true_value_and_proxy_are_separate():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda z, b: ((z.argmax(-1) == 0).sum().to(z.dtype), torch.tensor(4.0))  # noqa: E731
    proxy = lambda z, b: z.softmax(-1)[:, 0].mean()  # noqa: E731
    m = C.metric(fn, ">=", 0.5, proxy=proxy).measure_batch(logits, {})
    assert float(m.count) == 4 and not m.value_sum.requires_grad
    torch.testing.assert_close(m.proxy, logits.softmax(-1)[:, 0].mean())
    assert m.proxy_sum.requires_grad


def test_measure_context_validates_the_mask_once_and_rejects_a_bad_one() -> None:
    logits = torch.zeros(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    ctx = C.MeasureContext(student_logits=logits, batch={"mask": mask})
    assert ctx.mask is ctx.mask and torch.equal(ctx.mask, mask)
    assert C.MeasureContext(student_logits=logits, batch={}).mask.all()
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be a bool tensor of shape \(2, 3\)"):
        _ = C.MeasureContext(student_logits=logits, batch={"mask": mask.float()}).mask


def test_cap_unsafe_mass_dense_and_bucketed_agree_including_all_mass_unsafe():
    """The one target correction: dense over V and on buckets (a bucket of n tokens = n equal tokens) give the same
    distribution, also where q(U) = 1 (the safe mass is spread uniformly over the safe tokens)."""
    from safekd.unsafe import cap_unsafe_mass

    torch.manual_seed(0)
    V, eps = 7, 0.1
    in_u = torch.tensor([True, True, True, False, False, False, False])
    q = torch.softmax(torch.randn(3, V, dtype=torch.float64), -1)
    q[1] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # q(U) = 1
    q[2] = torch.tensor([0.01, 0.0, 0.0, 0.49, 0.5, 0.0, 0.0], dtype=torch.float64)  # already ≤ ε: unchanged
    dense, need = cap_unsafe_mass(q.log(), in_u, eps)
    assert need.tolist() == [True, True, False]
    p = dense.exp()
    assert torch.allclose(p.sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(p[:, in_u].sum(-1)[:2], torch.full((2,), eps, dtype=torch.float64))
    assert torch.allclose(p[1, ~in_u], torch.full((4,), (1 - eps) / 4, dtype=torch.float64))
    assert torch.equal(dense[2], q[2].log())
    # buckets: tokens 0, 3 alone; {1, 2} (unsafe) and {4, 5, 6} (safe) as uniform tail buckets
    groups = [[0], [3], [1, 2], [4, 5, 6]]
    in_b = torch.tensor([True, False, True, False])
    log_count = torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=torch.float64).log()
    qb = torch.stack([q[:, g].sum(-1) for g in groups], -1)
    bucketed, need_b = cap_unsafe_mass(qb.log(), in_b, eps, log_count)
    assert torch.equal(need_b, need)
    expected = torch.stack([p[:, g].sum(-1) for g in groups], -1)
    assert torch.allclose(bucketed.exp(), expected, atol=1e-15)
