"""Theorem harnesses: each shows its result, and the failing cases fail where the assumptions fail."""
from __future__ import annotations

import json
import math

import pytest

from safekd.theory import HARNESSES, TheoryResult, run

EXPECTED = {"convergence-convex", "convergence-rate", "convergence-nonconvex", "convergence-mlp",
            "stability-perturbation", "stability-fixed-point", "safety-preservation", "composition",
            "distribution-shift", "recursive"}


def test_registry_names():
    assert set(HARNESSES) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_harness_shows_its_result(name):
    result = run(name, plot=False)
    assert isinstance(result, TheoryResult)
    assert result.passed, result.message
    assert result.name == name
    assert result.source_tag in ("paper claim", "reconstruction")
    assert result.assumptions and result.claim and result.figure is None
    payload = json.dumps(result.to_dict(), allow_nan=False)
    back = json.loads(payload)
    assert back["passed"] is True and back["measured"] == pytest.approx(result.measured)


def test_nonconvex_counterexample_kl_stays():
    r = run("convergence-nonconvex", plot=False, seed=3)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert abs(r.measured - 0.1308) < 1e-3 and r.bound == pytest.approx(expected, abs=1e-12)
    assert r.details["grad_norm_final"] < 1e-8 and r.details["theta_final"] == 0.0
    assert r.details["contrast_kl_final"] < 1e-2          # leaving the stationary point does reach q
    assert "does NOT go to 0" in r.message


def test_rate_slope_is_minus_one_with_sampled_labels():
    r = run("convergence-rate", plot=False)
    assert -1.3 <= r.measured <= -0.7
    assert r.details["exact_target_slope"] < -2.0       # exact targets: linear, not O(1/t)


def test_convex_toy_fails_when_stopped_early():
    assert not run("convergence-convex", plot=False, steps=20).passed


def test_safety_violator_operator_fails():
    good = run("safety-preservation", plot=False, seed=1)
    bad = run("safety-preservation", plot=False, seed=1, operator="anti")
    assert good.passed and good.measured >= 0
    assert not bad.passed and bad.measured < 0 and bad.details["chebyshev_violations"] > 0
    assert "FAILS" in bad.message


def test_safety_accepts_user_operator_and_validates_it():
    import torch

    uniform = run("safety-preservation", plot=False, operator=lambda s: torch.full_like(s, 1 / s.shape[-1]))
    assert uniform.passed and abs(uniform.measured) < 1e-12        # Chebyshev with equality
    with pytest.raises(ValueError, match="simplex"):
        run("safety-preservation", plot=False, operator=lambda s: s)


def test_non_contractive_damped_update_fails():
    good = run("stability-fixed-point", plot=False)
    bad = run("stability-fixed-point", plot=False, sharpness=30.0, mu=0.05)
    assert good.measured < 1 and good.details["unique"]
    assert not bad.passed and bad.measured >= 1 and not bad.details["unique"]


def test_perturbation_p1_fails_for_geometric_pool():
    r = run("stability-perturbation", plot=False, pool="geometric")
    assert not r.passed
    assert r.details["bounds"]["P1w pooled target vs weights"]["violations"] > 0
    assert r.details["bounds"]["P5 geometric log-target vs weights"]["violations"] == 0
    assert run("stability-perturbation", plot=False).details["bounds"]["P3 logit gradient vs target"][
        "max_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_composition_tight_cases_reach_bound():
    r = run("composition", plot=False, seed=2)
    assert r.details["tight_ratio_case"] == pytest.approx(1.0, abs=1e-9)
    assert r.details["tight_lipschitz_case"] == pytest.approx(1.0, abs=1e-9)
    assert r.details["lipschitz_max_tightness"] < 1.0


def test_recursive_contracts_and_low_rank_floor():
    r = run("recursive", plot=False, alpha=0.5)
    assert r.passed and r.details["measured_factor"] <= 0.5 + 1e-9
    assert r.details["low_rank"]["kl_floor"] > 1e-3
    assert not run("recursive", plot=False, generations=3).passed   # not yet at the fixed point


def test_distribution_shift_context_weights_help():
    r = run("distribution-shift", plot=False, seed=1)
    w = r.details["weightings"]
    assert w["context"]["true_kl_test"] < w["uniform"]["true_kl_test"]
    assert all(v["delta"] <= v["bound"] for v in w.values())


def test_save_plot(tmp_path):
    r = run("composition")
    path = r.save_plot(tmp_path / "composition.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no figure"):
        run("composition", plot=False).save_plot(tmp_path / "x.png")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown theory harness"):
        run("nope")
    with pytest.raises(ValueError, match="samples"):
        run("composition", samples=0)
    with pytest.raises(ValueError, match="gamma"):
        run("convergence-convex", gamma=0.4)
    with pytest.raises(ValueError, match="seed"):
        run("recursive", seed=-1)
    with pytest.raises(ValueError, match="source_tag"):
        TheoryResult(name="x", claim="c", source_tag="guess", assumptions=(), measured=0, bound=0,
                     comparison="", passed=True, message="", reference="", seed=0)


def test_nonconvex_gradient_plot_has_a_readable_log_axis():
    from safekd.theory import run

    low, high = run("convergence-nonconvex").figure.axes[1].get_ylim()
    assert 1e-20 <= low < 1e-15 and 1e-2 < high < 1e3  # exact zeros drawn at a floor, not at 1e-300
