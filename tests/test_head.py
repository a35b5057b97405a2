"""A student given as hidden states + LM head (StudentHidden): the chunked sparse path equals the full-logits one."""
import functools

import pytest
import torch

from safekd import constraints as C
from safekd.distiller import SafeDistiller
from safekd.divergences import generalized_jsd, reverse_kl
from safekd.head import StudentHidden, head_reductions
from safekd.sparse import topk_logprobs
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.teachers import logits_of
from safekd.unsafe import UnsafeSet
from safekd.signals import MissingSignalError
from safekd.weighting.base import WeightOperator
from safekd.weighting import AEKD, GoldLikelihood

U = [0, 1, 5, 9]
V = 16


class Student(torch.nn.Module):
    """Embedding → tanh → LM head; ``hidden=True`` returns the hidden states and the head (chunks of 5 tokens)."""

    def __init__(self, hidden: bool, bias: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.emb = torch.nn.Embedding(V, 6)
        self.out = torch.nn.Linear(6, V, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | StudentHidden:
        h = torch.tanh(self.emb(x))
        return StudentHidden.of(h, self.out, chunk_size=5) if self.hidden else self.out(h)


def _batch(k: int, B: int = 2, T: int = 7, K: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, K, V, generator=g, dtype=torch.float64)
    logits[..., 2, U] += 4.0  # the risky teacher likes the unsafe tokens
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # masked positions (mask defaults to labels != -100)
    return {"inputs": torch.randint(0, V, (B, T), generator=g), "labels": labels,
            **topk_logprobs(logits, k, UnsafeSet(U))}


def _distiller(hidden: bool, constraints: list, temperature: float = 1.0, bias: bool = True,
               order: str = "simultaneous", **kw) -> tuple[SafeDistiller, Student]:
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=constraints, unsafe=U, temperature=temperature, dual=DualSpec(lr=0.5),
                checks=ChecksSpec(reference_every=0, alarm_window=0))
    torch.manual_seed(0)
    student = Student(hidden, bias).double()
    return SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1), spec, order=order,
                         **kw), student


BASE = [C.unsafe_mass(0.05), C.cap("risky", 0.6)]


@pytest.mark.parametrize("constraints,temperature,divergence,k", [
    (BASE, 1.0, None, 3),
    (BASE + [C.unsafe_rate(0.1)], 1.0, None, 4),
    (BASE + [C.unsafe_rate(0.1), C.unsafe_rate(0.2, unsafe=[2, 3], name="other"), C.retain("accuracy", 0.5)],
     2.0, functools.partial(generalized_jsd, beta=0.3), 2),
    ([C.retain("target_agreement", 0.9), C.unsafe_rate(0.05)], 1.0, functools.partial(reverse_kl,
                                                                                        validate_args=False), V),
    ([C.unsafe_rate(0.05)], 1.5, None, 5),
])
def test_hidden_states_and_head_give_the_full_logits_step(constraints, temperature, divergence, k) -> None:
    batch = _batch(k)
    kw = {"weighting": GoldLikelihood(beta=1.0, epsilon=0.1)}
    if divergence is not None:
        kw["divergence"] = divergence
    out = {}
    for hidden in (False, True):
        d, student = _distiller(hidden, constraints, temperature, **kw)
        loss, pending = d.loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        states = [(s["value"], s["proxy_residual"].detach(), s["count"]) for s in pending.states]
        record = d.finish_step(pending)
        d.optimizer.step()
        d.zero_grad()
        second = d.step(batch)  # a second step at the new multipliers and parameters
        out[hidden] = (loss.detach(), grads, states, record, second, [p.detach().clone() for p in
                                                                       student.parameters()])
    (l0, g0, s0, r0, q0, p0), (l1, g1, s1, r1, q1, p1) = out[False], out[True]
    torch.testing.assert_close(l1, l0, rtol=1e-11, atol=1e-12)
    for name in g0:  # the head's weight and bias, and the embedding (∂/∂hidden chained through tanh)
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12, msg=name)
    for a, b in zip(s1, s0):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    for r, q in ((r1, r0), (q1, q0)):
        assert r.constraints.keys() == q.constraints.keys()
        for name in r.constraints:
            for key in ("value", "residual", "multiplier", "count"):
                assert r.constraints[name][key] == pytest.approx(q.constraints[name][key], rel=1e-9, abs=1e-12)
        assert r.loss == pytest.approx(q.loss, rel=1e-10)
        assert r.projection["projected_tokens"] == q.projection["projected_tokens"]
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_primal_dual_order_remeasures_through_the_head() -> None:
    batch = _batch(3)
    records = [_distiller(h, BASE + [C.unsafe_rate(0.05), C.retain("accuracy", 0.5)], order="primal_dual")[0]
               .step(batch) for h in (False, True)]
    for name, c in records[0].constraints.items():
        for key in ("value", "multiplier"):
            assert records[1].constraints[name][key] == pytest.approx(c[key], rel=1e-9, abs=1e-12)


def test_head_reductions_gradients_match_finite_differences() -> None:
    g = torch.Generator().manual_seed(1)
    N, H, m = 7, 3, 4
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    gather = torch.randint(0, V, (N, m), generator=g)
    ids = torch.tensor(U)
    exclude = torch.rand(N, len(U), generator=g) < 0.4
    exclude[0] = True  # a fully excluded row: about −1e4, no NaN

    def f(h, w, b):
        r = head_reductions(StudentHidden(h, w, b, chunk_size=3), gather, (1.0, 0.7),
                            [(1, ids, exclude), (0, ids, None)])
        return r.gathered, r.lse, r.set_lse.clamp_min(-50)

    assert torch.autograd.gradcheck(f, (h, w, b))
    z = h @ w.T + b
    r = head_reductions(StudentHidden(h, w, b, chunk_size=3), gather, (1.0, 0.7), [(0, ids, None)], argmax=True)
    torch.testing.assert_close(r.gathered, z.gather(1, gather))
    torch.testing.assert_close(r.lse[:, 1], torch.logsumexp(z / 0.7, -1))
    torch.testing.assert_close(r.set_lse[:, 0], torch.logsumexp(z[:, ids], -1))
    assert torch.equal(r.argmax, z.argmax(-1))


def test_constraints_that_need_full_logits_are_refused_before_anything_changes() -> None:
    batch = _batch(3)
    for c in (C.kl_to("safe", 1.0), C.metric(lambda z, b: z.mean(), "<=", 1.0, name="m"),
              C.unsafe_rate(0.1, unsafe=lambda V, batch=None: torch.arange(V) < 2, name="fn_set")):
        d, student = _distiller(True, BASE + [c])
        before = [p.clone() for p in student.parameters()]
        with pytest.raises(ValueError, match="StudentHidden"):
            d.step(batch)
        assert d.step_count == 0 and all(torch.equal(a, p) for a, p in zip(before, student.parameters()))
    d, student = _distiller(True, BASE, weighting=StudentConfidence())  # an operator reading the student gets none
    with pytest.raises(MissingSignalError, match="student_logits"):
        d.step(batch)
    assert d.step_count == 0
    d, student = _distiller(True, BASE, weighting=AEKD())  # comparing student and teachers: refused on a cache
    with pytest.raises(ValueError, match="AEKD .*dense teacher logits"):
        d.step(batch)
    assert d.step_count == 0


class StudentConfidence(WeightOperator):
    """Token weights from the student's top log-probability alone (same for every teacher)."""

    requires = frozenset({"student_logits"})

    def scores(self, s):
        top = torch.log_softmax(s.student_logits, -1).amax(-1, keepdim=True)
        return top.expand(*top.shape[:-1], 3)


def test_dense_teachers_and_the_audit_view_read_the_head_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, V, generator=g, dtype=torch.float64)
    batch = {"inputs": torch.randint(0, V, (2, 7), generator=g), "teacher_logits": logits}
    records = [_distiller(h, BASE + [C.unsafe_rate(0.1)])[0].step(batch) for h in (False, True)]
    assert records[1].loss == pytest.approx(records[0].loss, rel=1e-12)
    d, student = _distiller(True, BASE)
    sparse = _batch(3)
    torch.testing.assert_close(d.targets(sparse).target_logp, _distiller(False, BASE)[0].targets(sparse).target_logp)
    out = student(sparse["inputs"])
    torch.testing.assert_close(logits_of(out, "student"), student.out(torch.tanh(student.emb(sparse["inputs"]))))
    assert out.shape == (2, 7, V) and out.chunk == 5


def test_student_hidden_validates_its_parts() -> None:
    h, w = torch.zeros(2, 3), torch.zeros(V, 3)
    with pytest.raises(ValueError, match="weight"):
        StudentHidden(h, torch.zeros(V, 4))
    with pytest.raises(ValueError, match="bias"):
        StudentHidden(h, w, torch.zeros(V + 1))
    with pytest.raises(ValueError, match="chunk_size"):
        StudentHidden(h, w, chunk_size=0)
    with pytest.raises(TypeError, match="weight"):
        StudentHidden.of(h, torch.nn.ReLU())
    assert StudentHidden(h, w).chunk == (1 << 22) // V
