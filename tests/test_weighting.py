"""Weighting operators: formulas, required signals, state, composition identities."""
import math

import pytest
import torch

from safekd.signals import MissingSignalError, Signals, all_finite, no_nan_or_posinf
from safekd.weighting import (AEKD, CAMKD, AgreementSoftmax, ConfidenceSoftmax, DomainPosterior, EntropySoftmax,
                              GoldLikelihood, MTBert, Routing, SafetyPrior, Static, TaskQuality, Uniform,
                              capped_min_norm, compose, kd_logit_gradients, ordinal_rank)
from safekd.weighting.aekd import capped_min_norm_exact

K, V = 4, 9


def make_signals(batch=(3, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Signals(
        teacher_logits=2 * torch.randn(*batch, K, V, generator=g, dtype=dtype),
        labels=torch.randint(0, V, batch, generator=g),
        task_ids=torch.randint(0, 3, batch, generator=g),
        context=torch.randn(*batch, 2, generator=g, dtype=dtype),
        safety=torch.tensor([0.1, 0.7, 0.4, 0.9], dtype=dtype),
        student_logits=torch.randn(*batch, V, generator=g, dtype=dtype),
    )


ALL_OPS = [
    lambda: Uniform(), lambda: ConfidenceSoftmax(2.0, 0.1), lambda: EntropySoftmax(1.5, 0.2),
    lambda: AgreementSoftmax(3.0, 0.1), lambda: GoldLikelihood(1.0, 0.1), lambda: CAMKD(1.0, 0.1),
    lambda: MTBert(1.0, 0.1), lambda: AEKD(cap=0.5, epsilon=0.1), lambda: AEKD(reduce="batch"),
    lambda: SafetyPrior(EntropySoftmax(), 0.5), lambda: TaskQuality(3, K, epsilon=0.1),
    lambda: Routing({0: 1, 2: 2}, fallback=3, num_teachers=K), lambda: Static([1.0, 2.0, 3.0, 4.0]),
    lambda: DomainPosterior(K, centroids=torch.randn(K, 2)),
]


@pytest.mark.parametrize("make", ALL_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_operator_is_batched_on_the_simplex(make, dtype):
    s = make_signals(dtype=dtype)
    w = make()(s)
    assert w.shape == (3, 5, K) and w.dtype == dtype
    assert bool((w >= 0).all()) and torch.allclose(w.sum(-1), torch.ones(3, 5, dtype=dtype), atol=1e-6)


def test_missing_signals_are_errors_not_fallbacks():
    lp = torch.log_softmax(torch.randn(6, K, V), -1)
    sampled_only = Signals(sampled_logprobs=lp[..., 0], labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(MissingSignalError, match="sampled-token"):
        EntropySoftmax()(sampled_only)
    with pytest.raises(MissingSignalError, match="labels"):
        GoldLikelihood()(Signals(teacher_logprobs=lp))
    with pytest.raises(MissingSignalError, match="student_logits"):
        AEKD()(Signals(teacher_logprobs=lp))
    with pytest.raises(MissingSignalError, match="safety"):
        SafetyPrior(ConfidenceSoftmax())(Signals(teacher_logprobs=lp))
    with pytest.raises(ValueError, match="teacher_logits"):
        ConfidenceSoftmax()(Signals(teacher_logits=torch.full((2, K, V), float("nan"))))


def test_token_formulas_match_their_definitions():
    s = make_signals()
    p = torch.softmax(s.teacher_logits, -1)
    beta, eps = 1.7, 0.2
    mix = lambda x: (1 - eps) * torch.softmax(beta * x, -1) + eps / K  # noqa: E731
    torch.testing.assert_close(ConfidenceSoftmax(beta, eps)(s), mix(p.amax(-1)))
    ent = -(p * p.log()).sum(-1)
    torch.testing.assert_close(EntropySoftmax(beta, eps)(s), mix(-ent / math.log(V)))
    pbar = p.mean(-2, keepdim=True)
    m = (p + pbar) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (pbar * (pbar / m).log()).sum(-1)
    torch.testing.assert_close(AgreementSoftmax(beta, eps)(s), mix(-js / math.log(2)))
    py = p.gather(-1, s.labels[..., None, None].expand(3, 5, K, 1)).squeeze(-1)
    torch.testing.assert_close(GoldLikelihood(1.0, 0.0)(s), py / py.sum(-1, keepdim=True))
    ce = -py.log()
    torch.testing.assert_close(CAMKD(1.0, 0.0)(s), (1 - torch.softmax(ce, -1)) / (K - 1))
    inv = 1 / (1 + ce)
    torch.testing.assert_close(MTBert(1.0, 0.0)(s), inv / inv.sum(-1, keepdim=True))


def test_declared_bounds_follow_paper_spec_formula():
    d = ConfidenceSoftmax(beta=2.0, epsilon=0.1).declared(4)
    e = math.exp(2.0)
    assert d.w_min == pytest.approx(0.025 + 0.9 / (1 + 3 * e))
    assert d.w_max == pytest.approx(0.025 + 0.9 / (1 + 3 / e))
    assert d.lipschitz == pytest.approx(0.9 * 2.0 * 0.5)
    assert "bounded_influence" in d.claims
    assert "bounded_influence" not in GoldLikelihood(epsilon=0.0).declared(4).claims


def test_aekd_two_teachers_matches_mgda_closed_form():
    s = make_signals(batch=(7,))
    s = s.replace(teacher_logits=s.teacher_logits[:, :2], safety=None)
    g = kd_logit_gradients(s.logprobs(), s.student_logits)
    u = g / g.norm(dim=-1, keepdim=True)
    a = ((u[:, 1] - u[:, 0]) * u[:, 1]).sum(-1) / (u[:, 0] - u[:, 1]).pow(2).sum(-1)
    alpha = torch.stack([a.clamp(0, 1), 1 - a.clamp(0, 1)], -1)
    w = alpha / g.norm(dim=-1)
    torch.testing.assert_close(AEKD(cap=1.0)(s), w / w.sum(-1, keepdim=True))


def test_aekd_solvers_match_cvxpy_and_uniform_cap():
    cp = pytest.importorskip("cvxpy")
    g = torch.randn(5, K, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gram = g @ g.transpose(-1, -2)
    exact = capped_min_norm_exact(gram, 0.4)
    fista = capped_min_norm(gram, 0.4, max_iter=3000, tol=1e-10)
    obj = lambda a: torch.einsum("bk,bkj,bj->b", a, gram, a)  # noqa: E731
    ref = []
    for G in gram.numpy():
        x = cp.Variable(K)
        L = torch.linalg.cholesky(torch.as_tensor(G) + 1e-12 * torch.eye(K)).numpy()
        cp.Problem(cp.Minimize(cp.sum_squares(L.T @ x)), [x >= 0, x <= 0.4, cp.sum(x) == 1]).solve()
        ref.append(float(cp.sum_squares(L.T @ x).value))
    ref = torch.tensor(ref, dtype=torch.float64)
    assert torch.allclose(obj(exact), ref, atol=1e-6) and torch.allclose(obj(fista), ref, atol=1e-6)
    assert bool((exact <= 0.4 + 1e-9).all()) and torch.allclose(exact.sum(-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(capped_min_norm_exact(gram, 1 / K), torch.full((5, K), 1 / K, dtype=torch.float64))


def test_aekd_batch_reduce_respects_mask():
    s = make_signals(batch=(2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :3] = True
    w = AEKD(reduce="batch")(s.replace(mask=mask))
    sub = Signals(teacher_logits=s.teacher_logits[:, :3], student_logits=s.student_logits[:, :3])
    w_sub = AEKD(reduce="batch")(sub)
    torch.testing.assert_close(w[0, 0], w_sub[0, 0])
    assert torch.allclose(w, w[:1, :1].expand_as(w))


def test_task_quality_ema_state_and_errors():
    op = TaskQuality(num_tasks=3, num_teachers=2, momentum=0.5)
    op.update(torch.tensor([0, 0, 1]), torch.tensor([[1.0, 3.0], [3.0, 1.0], [0.5, 0.5]]))
    torch.testing.assert_close(op.loss_ema, torch.tensor([[2.0, 2.0], [0.5, 0.5], [0.0, 0.0]]))
    op.update(torch.tensor([0]), torch.tensor([[0.0, 4.0]]))
    torch.testing.assert_close(op.loss_ema[0], torch.tensor([1.0, 3.0]))
    w = op(Signals(task_ids=torch.tensor([0, 2])))
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([-1.0, -3.0]), -1))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5]))  # unseen task: uniform
    clone = TaskQuality(num_tasks=3, num_teachers=2)
    clone.load_state_dict(op.state_dict())
    torch.testing.assert_close(clone(Signals(task_ids=torch.tensor([0]))), w[:1])
    with pytest.raises(ValueError, match="task_ids"):
        op(Signals(task_ids=torch.tensor([3])))


def test_routing_table_fallback_and_context_key():
    op = Routing({0: 1, 5: 2}, fallback=0, num_teachers=3, epsilon=0.3)
    w = op(Signals(task_ids=torch.tensor([0, 5, 7])))
    assert w.argmax(-1).tolist() == [1, 2, 0]
    torch.testing.assert_close(w.amax(-1), torch.full((3,), 0.7 + 0.1))
    ctx = Routing({3: 2}, fallback=1, num_teachers=3, key="context")
    assert ctx.scale == "context" and ctx(Signals(context=torch.tensor([[3.0], [1.0]]))).argmax(-1).tolist() == [2, 1]
    with pytest.raises(ValueError, match="outside"):
        Routing({0: 5}, fallback=0, num_teachers=3)


def test_domain_posterior_rule_and_classifier():
    mu = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    op = DomainPosterior(2, centroids=mu, bandwidth=0.5)
    w = op(Signals(context=torch.tensor([[0.1, -0.1], [4.0, 5.5]])))
    assert w.argmax(-1).tolist() == [0, 1]
    lin = torch.nn.Linear(2, 2)
    torch.testing.assert_close(DomainPosterior(2, classifier=lin)(Signals(context=mu)), torch.softmax(lin(mu), -1))
    with pytest.raises(ValueError, match="classifier must map"):
        DomainPosterior(3, classifier=lin)(Signals(context=mu))


def test_ordinal_rank_and_safety_prior_invariance():
    sigma = torch.tensor([0.3, 0.9, 0.3, 0.1])
    torch.testing.assert_close(ordinal_rank(sigma), torch.tensor([1.5, 3.0, 1.5, 0.0]))
    s = make_signals()
    op = SafetyPrior(ConfidenceSoftmax(2.0), gamma=0.7)
    w = op(s)
    torch.testing.assert_close(op(s.replace(safety=torch.exp(5 * s.safety))), w)
    base = ConfidenceSoftmax(2.0)(s)
    tilt = torch.softmax(torch.log(base) + 2.0 * 0.7 * ordinal_rank(s.safety), -1)
    torch.testing.assert_close(w, tilt)


def test_compose_identities():
    s = make_signals()
    a, b, c = ConfidenceSoftmax(2.0)(s), Static([1.0, 2.0, 3.0, 4.0])(s), EntropySoftmax()(s)
    u = torch.full_like(a, 1 / K)
    torch.testing.assert_close(compose(token=u, task=u, context=u).weights, u)  # uniform factors: identity
    torch.testing.assert_close(compose(token=a, task=u).weights, a)
    ref = a * b * c / (a * b * c).sum(-1, keepdim=True)
    comp = compose(token=a, task=b, context=c)
    torch.testing.assert_close(comp.weights, ref)
    torch.testing.assert_close(compose(token=c, task=a, context=b).weights, ref)
    assert set(comp.per_scale) == {"token", "task", "context"} and comp.per_scale["task"] is b
    half = compose(token=a, task=b, exponents={"task": 0.5}).weights
    torch.testing.assert_close(half, a * b.sqrt() / (a * b.sqrt()).sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="disjoint"):
        compose(token=torch.tensor([1.0, 0.0]), task=torch.tensor([0.0, 1.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_operators_run_on_cuda():
    s = make_signals()
    s = Signals(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in s.__dict__.items()})
    for make in ALL_OPS:
        op = make().cuda()
        assert op(s).device.type == "cuda"


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_kd_logit_gradients_match_autograd(divergence):
    s = make_signals(batch=(6,))
    lp = s.logprobs()
    z = s.student_logits.clone().requires_grad_(True)
    lq = torch.log_softmax(z, -1).unsqueeze(-2)
    kl = (lp.exp() * (lp - lq)).sum(-1) if divergence == "forward" else (lq.exp() * (lq - lp)).sum(-1)
    auto = torch.stack([torch.autograd.grad(kl[:, k].sum(), z, retain_graph=True)[0] for k in range(K)], -2)
    torch.testing.assert_close(kd_logit_gradients(lp, s.student_logits, divergence), auto)


def test_value_scans_are_exact_including_overflowing_sums():
    """One fused sum decides; a finite sum that overflows falls back to the exact scan (no false alarm)."""
    big = torch.full((8,), 3e38)  # Σ = inf in float32, every entry finite
    assert all_finite(big) and no_nan_or_posinf(big)
    assert all_finite(torch.full((4,), 6e4, dtype=torch.float16))  # summed in float32
    for bad in (math.nan, math.inf, -math.inf):
        t = big.clone()
        t[3] = bad
        assert not all_finite(t)
        assert no_nan_or_posinf(t) == (bad == -math.inf)
    mixed = torch.tensor([math.inf, -math.inf, 0.0])
    assert not all_finite(mixed) and not no_nan_or_posinf(mixed)
    assert all_finite(torch.tensor([1, 2])) and no_nan_or_posinf(torch.tensor([True]))
    lp = torch.log_softmax(torch.randn(2, 3, 5), -1)
    lp[0, 0, 0] = -math.inf
    ConfidenceSoftmax()(Signals(teacher_logprobs=lp))  # −inf log-probabilities are valid
    lp[0, 0, 1] = math.inf
    with pytest.raises(ValueError, match="'teacher_logprobs' contains NaN or \\+inf"):
        ConfidenceSoftmax()(Signals(teacher_logprobs=lp))
