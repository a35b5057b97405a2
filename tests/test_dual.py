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
from safekd.dual import AlarmMonitor, decreasing_trend_z, resolve_order
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


@pytest.mark.parametrize("order", list(COOPER))
def test_each_order_matches_cooper_iterate_for_iterate(order):
    data = toy_data()
    ours = Table(16, 6)
    d = SafeDistiller(ours, None, torch.optim.SGD(ours.parameters(), lr=PRIMAL_LR),
                      toy_spec(EPS, dual=DualSpec(lr=DUAL_LR)), order=order)
    theirs, cmp = Table(16, 6), CooperToy(data)
    opt = COOPER[order](cmp=cmp, primal_optimizers=torch.optim.SGD(theirs.parameters(), lr=PRIMAL_LR),
                        dual_optimizers=torch.optim.SGD(cmp.dual_parameters(), lr=DUAL_LR, maximize=True))
    worst_theta = worst_lam = 0.0
    for _ in range(200):
        d.step(data)
        opt.roll(compute_cmp_state_kwargs={"model": theirs})
        worst_theta = max(worst_theta, float((ours.theta - theirs.theta).detach().abs().max()))
        worst_lam = max(worst_lam, abs(float(d.multipliers["unsafe_rate"]) - float(cmp.multiplier.weight[0])))
    assert float(cmp.multiplier.weight[0]) > 1.0  # the constraint is active: λ moved a long way
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
