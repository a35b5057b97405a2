"""The dual core against its references: cooper-optim iterate for iterate in each update order, the augmented
Lagrangian against cvxpy's KKT multiplier, the alarm suite (feasible problems never alarm, infeasible ones always
do; relax bounds λ), no dual step without a measurement, deprecated order names."""
import warnings

import cooper
import pytest
import torch

from constrained_toys import Table, kkt_multiplier, margin_problem, toy_data, toy_spec
from safekd import constraints as C
from safekd.distiller import MultiplierAlarm, MultiplierAlarmError, SafeDistiller
from safekd.dual import AlarmMonitor, trend_z, resolve_order
from safekd.spec import ChecksSpec, DualSpec

EPS, PRIMAL_LR, DUAL_LR = 0.05, 10.0, 0.5


class CooperToy(cooper.ConstrainedMinimizationProblem):
    """The toy as cooper sees it: mean KL(q‖p_θ) s.t. mean p_θ(U) − ε ≤ 0, U = {0}."""

    def __init__(self, data):
        super().__init__()
        self.x, self.logq = data["inputs"], data["teacher_logits"][:, 0]
        self.multiplier = cooper.multipliers.DenseMultiplier(num_constraints=1, dtype=torch.float64)
        self.con = cooper.Constraint(constraint_type=cooper.ConstraintType.INEQUALITY, multiplier=self.multiplier,
                                     formulation_type=cooper.formulations.Lagrangian)

    def compute_cmp_state(self, model):
        logp = torch.log_softmax(model(self.x), -1)
        loss = (self.logq.exp() * (self.logq - logp)).sum(-1).mean()
        violation = logp[:, 0].exp().mean() - EPS
        return cooper.CMPState(loss=loss, observed_constraints={self.con: cooper.ConstraintState(violation=violation)})


COOPER = {"simultaneous": cooper.optim.SimultaneousOptimizer,
          "dual_primal": cooper.optim.AlternatingDualPrimalOptimizer,
          "primal_dual": cooper.optim.AlternatingPrimalDualOptimizer}


def _cooper_dual(rule, params):
    if rule == "gradient_ascent":
        return torch.optim.SGD(params, lr=DUAL_LR, maximize=True)
    from cooper.optim.torch_optimizers import nuPI, nuPIInitType

    return nuPI(params, lr=DUAL_LR, Kp=1.0, Ki=1.0, ema_nu=0.5, init_type=nuPIInitType.ZEROS, maximize=True)


@pytest.mark.parametrize("order, rule", [(o, "gradient_ascent") for o in COOPER] + [("simultaneous", "nupi")])
def test_each_order_matches_cooper_iterate_for_iterate(order, rule):
    data = toy_data()
    ours = Table(16, 6)
    d = SafeDistiller(ours, None, torch.optim.SGD(ours.parameters(), lr=PRIMAL_LR),
                      toy_spec(EPS, dual=DualSpec(rule=rule, lr=DUAL_LR, kp=1.0, ki=1.0, ema_nu=0.5)), order=order)
    theirs, cmp = Table(16, 6), CooperToy(data)
    opt = COOPER[order](cmp=cmp, primal_optimizers=torch.optim.SGD(theirs.parameters(), lr=PRIMAL_LR),
                        dual_optimizers=_cooper_dual(rule, cmp.dual_parameters()))
    worst_theta = worst_lam = 0.0
    for _ in range(200):
        d.step(data)
        opt.roll(compute_cmp_state_kwargs={"model": theirs})
        worst_theta = max(worst_theta, float((ours.theta - theirs.theta).detach().abs().max()))
        lam_cooper = float(cmp.multiplier.weight.detach()[0])
        worst_lam = max(worst_lam, abs(float(d.multipliers["unsafe_rate"]) - lam_cooper))
    assert lam_cooper > 1.0  # the constraint is active: λ moved a long way
    assert worst_theta < 1e-12 and worst_lam < 1e-12


def test_orders_differ_as_documented():
    """λ₁ = η·g(θ₀) for simultaneous and dual_primal, η·g(θ₁) for primal_dual; θ₁ uses λ₁ only in dual_primal."""
    data = toy_data()
    g0 = float(torch.softmax(torch.zeros(6), -1)[0]) - EPS
    lams, thetas = {}, {}
    for order in COOPER:
        st = Table(16, 6)
        d = SafeDistiller(st, None, torch.optim.SGD(st.parameters(), lr=PRIMAL_LR), toy_spec(EPS), order=order)
        d.step(data)
        lams[order], thetas[order] = float(d.multipliers["unsafe_rate"]), st.theta.detach().clone()
    assert lams["simultaneous"] == pytest.approx(DUAL_LR * g0) == lams["dual_primal"]
    g1 = float(torch.softmax(thetas["primal_dual"], -1)[:, 0].mean()) - EPS
    assert lams["primal_dual"] == pytest.approx(DUAL_LR * g1) and g1 != pytest.approx(g0)
    assert torch.equal(thetas["simultaneous"], thetas["primal_dual"])
    assert not torch.allclose(thetas["simultaneous"], thetas["dual_primal"])


def test_deprecated_order_names_map_with_a_warning():
    with pytest.warns(DeprecationWarning, match="use order='dual_primal'"):
        assert resolve_order("dual_first") == "dual_primal"
    with pytest.warns(DeprecationWarning, match="re-measures"):
        assert resolve_order("primal_first") == "primal_dual"
    with pytest.raises(ValueError, match=r"order must be one of \['simultaneous', 'dual_primal', 'primal_dual'\]"):
        resolve_order("alternating")


# ---------------------------------------------------------------- augmented Lagrangian with its default schedule
def test_augmented_lagrangian_defaults_converge_to_the_kkt_multiplier_on_the_toy():
    data = toy_data()
    lam_star = kkt_multiplier(data, EPS)
    st = Table(16, 6)
    d = SafeDistiller(st, None, torch.optim.SGD(st.parameters(), lr=PRIMAL_LR),
                      toy_spec(EPS, dual=DualSpec(rule="augmented_lagrangian")))
    for _ in range(800):
        d.step(data)
    assert abs(float(d.multipliers["unsafe_rate"]) - lam_star) < 1e-2
    assert float(d.dual_optimizer.penalty_coefficient(0)) <= DualSpec().max_penalty


def test_augmented_lagrangian_defaults_converge_on_the_margin_kkt_problem():
    d, batch, _, lam_star = margin_problem(DualSpec(rule="augmented_lagrangian"))
    for _ in range(400):
        d.step(batch)
    assert abs(float(d.multipliers["margin"]) - lam_star) < 1e-2


# ---------------------------------------------------------------- no measurement, no dual step
def test_a_window_with_no_unmasked_token_does_not_move_the_multiplier():
    data = toy_data()
    st = Table(16, 6)
    d = SafeDistiller(st, None, torch.optim.SGD(st.parameters(), lr=PRIMAL_LR), toy_spec(EPS))
    d.step(data)
    lam = float(d.multipliers["unsafe_rate"])
    rec = d.step({**data, "mask": torch.zeros(16, dtype=torch.bool)})
    assert lam > 0 and float(d.multipliers["unsafe_rate"]) == lam
    assert rec.constraints["unsafe_rate"]["count"] == 0.0


# ---------------------------------------------------------------- alarms: a suite of feasible and infeasible problems
def _p_unsafe_at_least(x):
    def fn(logits, batch):
        return torch.softmax(logits, -1)[..., 0].mean()
    return C.metric(fn, ">=", x, name="p_unsafe_floor")


def _toy_run(steps, *, dual=DualSpec(), extra=(), student=None, minibatch=None, checks=ChecksSpec(reference_every=0),
             eps=EPS, order="simultaneous"):
    data = toy_data()
    st = student or Table(16, 6)
    d = SafeDistiller(st, None, torch.optim.SGD(st.parameters(), lr=PRIMAL_LR),
                      toy_spec(eps, dual=dual, checks=checks, extra=extra), order=order)
    g = torch.Generator().manual_seed(0)
    alarmed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultiplierAlarm)
        for _ in range(steps):
            batch = data if minibatch is None else {k: v[torch.randperm(16, generator=g)[:minibatch]]
                                                     for k, v in data.items()}
            rec = d.step(batch)
            alarmed += [a["constraint"] for a in rec.alarms]
    return d, rec, alarmed


FEASIBLE = {
    "default dual lr": dict(steps=400),
    "fast dual lr, to convergence": dict(steps=1200, dual=DualSpec(lr=0.5)),
    "minibatches of 4 contexts": dict(steps=600, dual=DualSpec(lr=0.5), minibatch=4),
    "nuPI": dict(steps=400, dual=DualSpec(rule="nupi", lr=0.3, kp=1.0, ema_nu=0.5)),
    "augmented Lagrangian": dict(steps=400, dual=DualSpec(rule="augmented_lagrangian")),
    "alternating primal_dual": dict(steps=400, dual=DualSpec(lr=0.5), order="primal_dual"),
    "tight but feasible threshold": dict(steps=500, dual=DualSpec(lr=0.5), eps=0.005),
}
INFEASIBLE = {
    "student cannot move the rate": dict(steps=100, student=Table(16, 6, frozen=list(range(6)))),
    "two constraints in conflict": dict(steps=300, extra=(_p_unsafe_at_least(0.2),), dual=DualSpec(lr=0.5)),
    "unattainable metric": dict(steps=100, extra=(C.metric(lambda z, b: z.new_tensor(1.0), "<=", 0.5, name="const"),)),
}


@pytest.mark.parametrize("case", list(FEASIBLE))
def test_no_alarm_on_feasible_problems(case):
    d, rec, alarmed = _toy_run(**FEASIBLE[case])
    assert alarmed == [] and d.events["alarms"] == 0
    assert rec.constraints["unsafe_rate"]["multiplier"] > 0  # the constraint was active: λ had work to do


@pytest.mark.parametrize("case", list(INFEASIBLE))
def test_every_infeasible_problem_is_flagged(case):
    _, _, alarmed = _toy_run(**INFEASIBLE[case])
    assert alarmed


def test_alarm_is_a_trend_test_with_a_minimum_violation():
    assert trend_z([5, 4, 3, 2, 1]) < -1.645 < trend_z([1, 1, 1, 1, 1]) == 0.0
    mon = AlarmMonitor(["c"], window=5, min_violation=1e-3, level=0.05)
    assert [mon.update("c", float(i), 0.2) for i in range(8)] == [False] * 5 + [True, False, False]  # raised once
    assert mon.active == {"c"}
    for i in range(5):  # a tiny violation (round-off near convergence) clears it and never raises it
        assert not mon.update("c", 10.0 + i, 5e-10)
    assert mon.active == set()
    for i in range(5):  # a growing λ with a clearly shrinking violation is convergence, not an alarm
        assert not mon.update("c", 20.0 + i, 0.5 / (i + 1))


def test_on_alarm_relax_bounds_the_multiplier_and_reports_the_relaxation(tmp_path):
    from safekd.steplog import StepLog, read_step_log

    frozen = Table(16, 6, frozen=list(range(6)))  # p(U) = 1/6 forever: 0.05 is unattainable
    checks = ChecksSpec(reference_every=0, on_alarm="relax", relax_cost=1.0, relax_lr=0.5)
    data = toy_data()
    d = SafeDistiller(frozen, None, torch.optim.SGD(frozen.parameters(), lr=1.0),
                      toy_spec(EPS, dual=DualSpec(lr=0.5), checks=checks), log=StepLog(tmp_path / "s.jsonl"))
    with pytest.warns(MultiplierAlarm, match="Relaxing it"):
        recs = [d.step(data) for _ in range(400)]
    d.log.close()
    gap = 1 / 6 - EPS
    u, lam = recs[-1].constraints["unsafe_rate"]["relaxation"], recs[-1].constraints["unsafe_rate"]["multiplier"]
    assert u == pytest.approx(gap, abs=1e-3) and lam == pytest.approx(gap, abs=1e-3)  # α u = λ, g − u = 0
    relaxations = [r["constraints"]["unsafe_rate"]["relaxation"] for r in read_step_log(tmp_path / "s.jsonl")]
    assert relaxations[0] == 0 and relaxations[-1] == u  # the step log carries it, for the audit


def test_on_alarm_stop_raises_after_the_step_is_logged():
    frozen = Table(16, 6, frozen=list(range(6)))
    d = SafeDistiller(frozen, None, torch.optim.SGD(frozen.parameters(), lr=1.0),
                      toy_spec(EPS, checks=ChecksSpec(reference_every=0, alarm_window=5, on_alarm="stop")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultiplierAlarm)
        for _ in range(5):
            d.step(toy_data())
        with pytest.raises(MultiplierAlarmError, match="stopped on the multiplier alarm of \\['unsafe_rate'\\]"):
            d.step(toy_data())
    assert d.step_count == 6 and d.events["alarms"] == 1
