"""SafeDistiller: KKT convergence against cvxpy, guards, infeasibility, target correction, alarms, logging."""
import json
import warnings

import numpy as np
import pytest
import torch

import solvers
from safekd import constraints as C
from safekd.distiller import MultiplierAlarm, NonFiniteError, SafeDistiller
from safekd.divergences import forward_kl
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.steplog import StepLog, read_step_log
from safekd.unsafe import UnsafeSet
from safekd.weighting import ConfidenceSoftmax

from constrained_toys import margin_problem
from students import Student

NO_CHECKS = ChecksSpec(reference_every=0, alarm_window=0)


def _setup(constraints, V=12, K=3, B=2, T=6, seed=0, checks=NO_CHECKS, **kw):
    g = torch.Generator().manual_seed(seed)
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)][:K],
                constraints=constraints, unsafe=[0, 1], dual=DualSpec(lr=0.1), checks=checks)
    torch.manual_seed(seed)
    student = Student(V)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = {"inputs": torch.randint(0, V, (B, T), generator=g),
             "teacher_logits": 2 * torch.randn(B, T, K, V, generator=g),
             "labels": torch.randint(0, V, (B, T), generator=g)}
    return SafeDistiller(student, None, opt, spec, **kw), student, batch


def _snapshot(d):
    return [p.detach().clone() for p in d.student.parameters()], {n: t.clone() for n, t in d.multipliers.items()}



def _capture_targets(d: SafeDistiller) -> dict:
    """Wrap the distiller's divergence so the pooled target it receives is kept in the returned dict."""
    seen = {}

    def capture(target_logp, student_logits, mask=None, temperature=1.0):
        seen["target"] = target_logp
        return forward_kl(target_logp, student_logits, mask, temperature)

    d.divergence = capture
    return seen

def test_convex_problem_converges_to_cvxpy_kkt_point():
    """Softmax regression, fixed target, one linear constraint (mean logit margin ≤ b) + ℓ2 (weight decay)."""
    d, batch, theta, lam = margin_problem(DualSpec(rule="gradient_ascent", lr=0.5))
    assert lam > 0.1  # the constraint is active at the optimum
    for _ in range(400):
        rec = d.step(batch)
    assert np.abs(d.student.weight.detach().numpy() - theta).max() < 1e-3
    assert abs(float(d.multipliers["margin"]) - lam) < 1e-3
    assert abs(rec.constraints["margin"]["value"] - (-0.3)) < 1e-3


def test_step_record_projection_and_feasibility_of_weights():
    cons = [C.cap("risky", 0.2), C.unsafe_mass(0.3), C.safety_order(), C.unsafe_rate(0.05)]
    d, _, batch = _setup(cons, weighting=ConfidenceSoftmax(beta=3.0),
                         checks=ChecksSpec(reference_every=1, alarm_window=0))
    batch["mask"] = torch.ones(2, 6, dtype=torch.bool)
    batch["mask"][1, 3:] = False
    seen = _capture_targets(d)
    rec = d.step(batch)
    assert rec.projection["tokens"] == 9
    assert rec.reference_check["rows"] > 0 and rec.reference_check["max_abs_diff"] < 1e-4
    assert rec.weights["projected"]["risky"] <= 0.2 + 1e-6
    assert set(rec.weights) == {"token", "composed", "projected"}
    assert rec.constraints["unsafe_rate"]["multiplier"] == pytest.approx(max(0.0, 0.1 * rec.constraints["unsafe_rate"]["residual"]))
    # every unmasked, non-relaxed token's pooled target respects the per-token unsafe mass bound
    mass = UnsafeSet([0, 1]).mass(seen["target"])[batch["mask"]]
    assert float(mass.max()) <= 0.3 + 1e-5
    json.dumps(rec.to_dict())


def test_relaxed_tokens_get_their_target_corrected():
    """Every teacher puts ≥ 60% mass on U at one token, so Σ w_k p_k(U) ≤ 0.1 is empty there."""
    d, _, batch = _setup([C.unsafe_mass(0.1)])
    tl = batch["teacher_logits"]
    tl[0, 0, :, :2] += 8.0  # token (0, 0): all teachers unsafe
    tl[..., 1:, :, :2] -= 8.0  # all other tokens: teachers safe
    seen = _capture_targets(d)
    rec = d.step(batch)
    assert rec.projection["relaxed_tokens"] == 1 and rec.projection["corrected_tokens"] == 1
    q = seen["target"].exp()
    assert torch.allclose(q.sum(-1), torch.ones(2, 6), atol=1e-5)
    assert float(q[0, 0, :2].sum()) == pytest.approx(0.1, abs=1e-5)
    # The least-relaxed weights put everything on the least unsafe teacher; the safe mass keeps its proportions.
    lp = torch.log_softmax(tl[0, 0], -1)
    p = lp[lp.exp()[:, :2].sum(-1).argmin()].exp()
    torch.testing.assert_close(q[0, 0, 2:] / q[0, 0, 2:].sum(), p[2:] / p[2:].sum(), rtol=1e-4, atol=1e-6)
    assert d.events["corrected_tokens"] == 1


def test_static_infeasible_spec_fails_at_construction_naming_constraints():
    with pytest.raises(solvers.InfeasibleError) as exc:
        _setup([C.floor("safe", 0.6), C.floor("risky", 0.6), C.cap("mid", 0.5)])
    assert "floor(safe)" in str(exc.value) and "floor(risky)" in str(exc.value)


@pytest.mark.parametrize("where", ["teacher", "student"])
def test_nan_guard_stops_before_any_change(where):
    d, student, batch = _setup([C.unsafe_rate(0.01)])
    d.step(batch)
    params, lams = _snapshot(d)
    if where == "teacher":
        batch["teacher_logits"][1, 2, 2, 5] = float("nan")
        match = r"teacher logits contain NaN or inf \(teachers \['risky'\]\)"
    else:
        with torch.no_grad():
            student.out.bias[3] = float("nan")
        params, lams = _snapshot(d)
        match = "student logits contain NaN or inf"
    with pytest.raises(NonFiniteError, match=match):
        d.step(batch)
    after, lams_after = _snapshot(d)
    assert all(torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() for a, b in zip(params, after))
    assert lams == lams_after and d.step_count == 1


@pytest.mark.parametrize("order", ["simultaneous", "dual_primal", "primal_dual"])
def test_nan_gradients_leave_student_and_multipliers_unchanged_in_every_order(order):
    d, student, batch = _setup([C.unsafe_rate(0.01)], order=order, checks=ChecksSpec(reference_every=0, alarm_window=2))
    d.step(batch)
    params, lams = _snapshot(d)
    rule, meter = d.dual_optimizer.state_dict(), d.meter.state_dict()
    student.out.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="student gradients contain NaN or inf"):
        d.step(batch)
    after, lams_after = _snapshot(d)
    assert all(torch.equal(a, b) for a, b in zip(params, after)) and d.step_count == 1
    assert lams == lams_after and lams["unsafe_rate"] > 0
    assert d.dual_optimizer.state_dict() == rule and d.meter.state_dict()["updates"] == meter["updates"]


def test_alarm_when_multiplier_grows_and_violation_does_not_shrink():
    """An unattainable metric (constant, independent of the student) must raise the alarm."""
    const = C.metric(lambda z, b: z.new_tensor(1.0), "<=", 0.5, name="unattainable")
    d, _, batch = _setup([const], checks=ChecksSpec(reference_every=0, alarm_window=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = [d.step(batch) for _ in range(7)]
    assert [bool(r.alarms) for r in recs] == [False] * 5 + [True] * 2  # stuck over 5//2 = 2 full windows
    assert recs[-1].alarms[0]["constraint"] == "unattainable" and "unattainable" in recs[-1].alarms[0]["message"]
    assert sum(issubclass(w.category, MultiplierAlarm) for w in caught) == 1  # warned once, flagged every step


def test_teacher_modules_names_and_jsonl_log(tmp_path):
    V = 12
    teachers = {n: torch.nn.Embedding(V, V) for n in ("risky", "safe", "mid")}
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=[C.group_cap(["mid", "risky"], 0.5), C.unsafe_rate(0.1), C.kl_to("safe", 5.0)],
                unsafe=[0], checks=NO_CHECKS)
    student = Student(V)
    with pytest.raises(ValueError, match=r"unknown teacher name\(s\) \['bad'\]; the spec's teachers are"):
        SafeDistiller(student, {"bad": teachers["safe"], **teachers}, torch.optim.SGD(student.parameters(), 0.1), spec)
    with StepLog(tmp_path / "log.jsonl", summary_every=1) as log:
        d = SafeDistiller(student, teachers, torch.optim.SGD(student.parameters(), 0.1), spec, log=log)
        x = torch.randint(0, V, (2, 5))
        for _ in range(2):
            rec = d.step({"inputs": x})
    rows = list(read_step_log(tmp_path / "log.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and rows[-1] == json.loads(json.dumps(rec.to_dict()))
    assert rec.weights["projected"]["mid"] + rec.weights["projected"]["risky"] <= 0.5 + 1e-6
    assert set(rec.constraints) == {"unsafe_rate", "kl_to(safe)"}


@pytest.mark.parametrize("rule", ["nupi", "augmented_lagrangian"])
def test_dual_rules_and_window(rule):
    spec_kw = dict(rule=rule, lr=0.1, kp=0.5, every=2)
    d, _, batch = _setup([C.unsafe_rate(0.0)])
    d2 = SafeDistiller(d.student, None, d.optimizer, Spec(teachers=d.spec.teachers, constraints=d.spec.constraints,
                                                         unsafe=[0, 1], dual=DualSpec(**spec_kw), checks=NO_CHECKS))
    r1, r2 = d2.step(batch), d2.step(batch)
    assert not r1.dual_updated and r2.dual_updated
    assert r1.constraints["unsafe_rate"]["multiplier"] == 0.0 and r2.constraints["unsafe_rate"]["multiplier"] > 0


def test_dual_primal_uses_the_updated_multiplier_in_the_primal_step():
    d, _, batch = _setup([C.unsafe_rate(0.0)], order="dual_primal")
    rec = d.step(batch)
    lam = rec.constraints["unsafe_rate"]["multiplier"]
    assert lam > 0 and rec.penalty == pytest.approx(lam * rec.constraints["unsafe_rate"]["residual"], rel=1e-5)


# ---------------------------------------------------------------- public surface: targets, loss, finish_step


def test_targets_are_what_step_trains_on():
    cons = [C.cap("risky", 0.2), C.unsafe_mass(0.3), C.unsafe_rate(0.05)]
    d, _, batch = _setup(cons, weighting=ConfidenceSoftmax(beta=3.0))
    batch["mask"] = torch.ones(2, 6, dtype=torch.bool)
    batch["mask"][1, 4:] = False
    t = d.targets(batch)
    seen = {}

    def capture(target_logp, student_logits, mask=None, temperature=1.0):
        seen["target"], seen["mask"] = target_logp, mask
        return forward_kl(target_logp, student_logits, mask, temperature)

    d.divergence = capture
    rec = d.step(batch)
    torch.testing.assert_close(t.target_logp, seen["target"], rtol=0, atol=0)
    assert torch.equal(t.mask, seen["mask"]) and t.projection == rec.projection
    assert t.weights.shape == t.composed.shape == (2, 6, 3) and set(t.per_scale) == {"token"}
    m = t.mask
    w = t.weights[m].double()
    assert t.feasible_set is not None and t.feasible_set.batch_shape == (10,)
    assert bool(t.feasible_set.contains(w, tol=1e-6).all()) and float(w[:, 2].max()) <= 0.2 + 1e-6  # float32 w
    assert rec.weights["projected"]["risky"] == pytest.approx(float(t.weights[m][:, 2].mean()), abs=1e-6)
    with pytest.raises(ValueError, match=r"student logits \(2, 6, 5\) do not match"):
        d.targets(batch, torch.zeros(2, 6, 5))


def test_loss_then_finish_step_equals_step():
    cons = [C.cap("risky", 0.3), C.unsafe_rate(0.05), C.retain("accuracy", 0.5)]
    a, sa, batch = _setup(cons)
    b, sb, _ = _setup(cons)
    for _ in range(3):
        ra = a.step(batch)
        loss, pending = b.loss(batch)
        b.optimizer.zero_grad()
        loss.backward()
        b.optimizer.step()
        rb = b.finish_step(pending)
        assert ra.to_dict() == rb.to_dict()
    assert all(torch.equal(p, q) for p, q in zip(sa.parameters(), sb.parameters()))
    with pytest.raises(RuntimeError, match="finished already"):
        b.finish_step(pending)


def test_framework_order_finish_before_backward_in_float64():
    """HF/Lightning call finish_step (which updates λ in place) before their backward: the loss must not hold λ."""
    spec = Spec(teachers=[TeacherSpec("a", 0.9), TeacherSpec("b", 0.1)], constraints=[C.unsafe_rate(0.0)],
                unsafe=[0], dual=DualSpec(lr=0.5), checks=NO_CHECKS)
    s = torch.nn.Linear(4, 6).double()
    d = SafeDistiller(s, None, torch.optim.SGD(s.parameters(), lr=0.1), spec)
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randn(5, 4, generator=g, dtype=torch.float64),
             "teacher_logits": torch.randn(5, 2, 6, generator=g, dtype=torch.float64)}
    for _ in range(2):
        loss, pending = d.loss(batch)
        rec = d.finish_step(pending)
        loss.backward()
    assert rec.dual_updated and float(d.multipliers["unsafe_rate"]) > 0 and s.weight.grad is not None


def test_every_token_set_empty_is_relaxed_not_raised():
    """All teachers put ≥ 60% mass on U at every token: Σ w_k p_k(U) ≤ 0.1 is empty everywhere."""
    d, _, batch = _setup([C.unsafe_mass(0.1)])
    batch["teacher_logits"][..., :2] += 8.0
    rec = d.step(batch)
    assert rec.projection["relaxed_tokens"] == rec.projection["corrected_tokens"] == 12
    t = d.targets(batch)
    assert bool(t.relaxed.all()) and bool(t.corrected.all())
    assert float(UnsafeSet([0, 1]).mass(t.target_logp).max()) == pytest.approx(0.1, abs=1e-5)


def test_finite_logits_whose_sum_overflows_are_not_a_nan_alarm():
    """The fused finiteness check (one sum) falls back to the exact scan when a finite sum overflows."""
    d, _, batch = _setup([C.cap("risky", 0.3), C.unsafe_rate(0.5)])
    batch["teacher_logits"][..., 3] = 3e38  # Σ overflows to inf in float32; every entry is finite
    t = d.targets(batch)
    assert torch.isfinite(t.target_logp).all() and torch.allclose(t.target_logp.exp().sum(-1), torch.ones(2, 6))
    batch["teacher_logits"][0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="teacher logits contain NaN or inf"):
        d.targets(batch)


def test_shared_student_logp_gives_the_same_loss_and_gradient_as_separate_normalisers():
    """The built-in divergence and unsafe_rate/kl_to share one log_softmax of the student; a custom divergence
    (computing its own) sees the same loss and gradient up to rounding."""
    cons = [C.unsafe_rate(0.01), C.kl_to("mid", 0.1)]
    d1, s1, batch = _setup(cons)
    d2, s2, _ = _setup(cons, divergence=lambda t, z, mask=None, temperature=1.0: forward_kl(t, z, mask, temperature))
    losses = []
    for d, s in ((d1, s1), (d2, s2)):
        loss, pending = d.loss(batch)
        s.zero_grad()
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in s.parameters()],
                       [float(st["value"]) for st in pending.states]))
    assert d1.divergence is d1._builtin_divergence and d2.divergence is not d2._builtin_divergence
    torch.testing.assert_close(losses[0][0], losses[1][0])
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b)
    assert losses[0][2] == pytest.approx(losses[1][2], rel=1e-6)
