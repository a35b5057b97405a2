"""Axiom checker: built-ins pass what they declare; planted violators are caught with witnesses."""
import pytest
import torch

from safekd.axioms import AxiomReport, check, check_axioms, check_pool, load_object
from safekd.pooling import GeometricPool, LinearPool, PowerMeanPool, TemperedPool
from safekd.weighting import (AEKD, CAMKD, AgreementSoftmax, ConfidenceSoftmax, DomainPosterior, EntropySoftmax,
                              GoldLikelihood, MTBert, Routing, SafetyPrior, Static, TaskQuality, Uniform,
                              WeightOperator, ordinal_rank)
from safekd.weighting.base import SafetyMode

BUILTINS = {
    "uniform": lambda: Uniform(),
    "static": lambda: Static([1.0, 2.0, 3.0, 4.0], epsilon=0.1),
    "confidence": lambda: ConfidenceSoftmax(2.0, 0.1),
    "entropy": lambda: EntropySoftmax(1.5, 0.1),
    "agreement": lambda: AgreementSoftmax(2.0, 0.1),
    "gold": lambda: GoldLikelihood(1.0, 0.1),
    "camkd": lambda: CAMKD(1.0, 0.1),
    "mtbert": lambda: MTBert(1.0, 0.1),
    "aekd": lambda: AEKD(cap=0.5, epsilon=0.1),
    "task_quality": lambda: TaskQuality(4, 4, epsilon=0.1),
    "domain": lambda: DomainPosterior(4, centroids=torch.randn(4, 3, generator=torch.Generator().manual_seed(0))),
    "routing": lambda: Routing({0: 1, 2: 3}, fallback=0, num_teachers=4, epsilon=0.05),
    "safety_prior": lambda: SafetyPrior(AgreementSoftmax(2.0, 0.1), gamma=0.5),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_operators_pass_their_declared_axioms(name):
    op = BUILTINS[name]()
    if name == "task_quality":
        op.update(torch.arange(4), torch.rand(4, 4, generator=torch.Generator().manual_seed(1)))
    report = check_axioms(op, batch=28, steps=4 if name == "aekd" else 6)
    assert report.passed, report.to_text()
    assert report["normalization"].declared and report["composition_closure"].passed


def test_safety_prior_declares_all_three_osm_readings():
    report = check_axioms(SafetyPrior(ConfidenceSoftmax(2.0, 0.1), gamma=1.0), batch=28)
    for name in ("safety_own_score", "safety_comonotone", "safety_ordinal"):
        assert report[name].declared and report[name].passed
    assert report["safety_comonotone"].measured["min_gap_safer_minus_less_safe"] > 0


class AntiSafety(WeightOperator):
    """Planted violator: gives more weight to the LESS safe teacher, claims ordinal OSM."""

    requires = frozenset({"teacher_logprobs", "safety"})

    def scores(self, s):
        return -ordinal_rank(s.safety).expand(s.logprobs().shape[:-1])

    def safety_mode(self) -> SafetyMode:
        return "ordinal"


class HardArgmax(WeightOperator):
    """Planted violator: one-hot on the most confident teacher, claims a Lipschitz constant."""

    requires = frozenset({"teacher_logprobs"})

    def forward(self, s):
        self.check_signals(s)
        conf = s.logprobs().amax(-1)
        onehot = torch.nn.functional.one_hot(conf.argmax(-1), conf.shape[-1]).to(conf.dtype)
        return (1 - self.epsilon) * onehot + self.epsilon / conf.shape[-1]

    def score_lipschitz(self):
        return 0.5

    def lipschitz_wrt(self):
        return ("teacher_logits",)


class OffSimplex(ConfidenceSoftmax):
    """Planted violator: weights sum to 1.1."""

    def forward(self, s):
        return 1.1 * super().forward(s)


class LeakyTask(WeightOperator):
    """Planted violator: a task-scale operator that reads token-level teacher confidence."""

    scale = "task"
    requires = frozenset({"task_ids", "teacher_logprobs"})

    def scores(self, s):
        return s.logprobs().amax(-1).exp() + s.task_ids.unsqueeze(-1).to(torch.float64)


def test_checker_catches_operator_that_favours_the_less_safe_teacher():
    report = check_axioms(AntiSafety(), batch=28)
    assert not report.passed
    for name in ("safety_own_score", "safety_comonotone"):
        r = report[name]
        assert r.declared and not r.passed and r.witness is not None
    wit = report["safety_comonotone"].witness
    assert wit["seed"] == report["safety_comonotone"].seed
    assert wit["weights"][wit["safer"]] < wit["weights"][wit["less_safe"]]
    assert report["safety_ordinal"].passed  # it is still ordinal: it reads ranks only


def test_checker_catches_discontinuous_operator_with_witness():
    report = check_axioms(HardArgmax(epsilon=0.1), batch=28)
    r = report["continuity"]
    assert r.declared and not r.passed
    assert r.measured["max_jump_at_1e-7"] > 0.5
    assert r.witness["case"] in {"identical", "uniform", "pair-tie", "one-hot"}  # found at a tie


def test_checker_catches_weights_off_the_simplex():
    r = check_axioms(OffSimplex(2.0), batch=28)["normalization"]
    assert not r.passed and r.measured["max_error"] == pytest.approx(0.1, rel=1e-6)
    assert sum(r.witness["weights"]) == pytest.approx(1.1, rel=1e-5)


def test_checker_catches_scale_leak():
    r = check_axioms(LeakyTask(), batch=28)["scale_separation"]
    assert r.declared and not r.passed and r.measured["max_change"] > 1e-3


def test_composition_closure_bound_is_tight():
    r = check_axioms(ConfidenceSoftmax(1.0, 0.1), batch=28)["composition_closure"]
    assert r.passed and 0.99 <= r.measured["tanh_tightness"] <= 1 + 1e-9
    assert r.measured["ratio_product_excess"] <= 1 + 1e-9


@pytest.mark.parametrize("pool", [LinearPool(), GeometricPool(), TemperedPool(0.5), PowerMeanPool(0.5),
                                  PowerMeanPool(-1.0)], ids=lambda p: f"{p.name}")
def test_builtin_pools_pass_their_declared_axioms(pool):
    report = check_pool(pool, batch=28, steps=4)
    assert report.passed, report.to_text()


def test_pool_checker_separates_strong_and_weak_forms():
    lin, geo = check_pool(LinearPool(), batch=28, steps=2), check_pool(GeometricPool(), batch=28, steps=2)
    assert lin["hull_membership"].passed and not geo["hull_membership"].passed  # geometric leaves the hull
    assert geo["temperature_coherence_strong"].passed and not lin["temperature_coherence_strong"].passed
    assert lin["temperature_coherence_weak"].passed and geo["temperature_coherence_weak"].passed
    assert lin["positivity_any"].passed and not geo["positivity_any"].passed  # geometric veto


def test_pool_checker_catches_unnormalised_pool():
    def sloppy(teacher_logp, weights):
        return (weights.unsqueeze(-1) * teacher_logp).sum(-2)  # forgot log Z
    report = check_pool(sloppy, batch=28, steps=2)
    assert not report.passed and not report["simplex_output"].passed
    assert "simplex_output" in [r.name for r in report.failures]


def test_report_text_load_object_and_dispatch():
    report = check(load_object("safekd.weighting:Uniform"), batch=14, steps=2)
    assert isinstance(report, AxiomReport) and report.passed
    text = check_axioms(OffSimplex(2.0), batch=14, steps=2).to_text()
    assert text.splitlines()[0].startswith("OffSimplex: ") and "[FAIL] W1" in text and "witness (seed=" in text
    assert check(load_object("safekd.pooling:linear_pool"), batch=14, steps=2).kind == "pool"
    with pytest.raises(ValueError, match="module:object"):
        load_object("safekd.pooling.linear_pool")
    with pytest.raises(ValueError, match="no attribute"):
        load_object("safekd.pooling:nope")
    assert report.to_dict()["passed"] is True
