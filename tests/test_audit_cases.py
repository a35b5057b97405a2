"""The audit's known ways to overstate a PASS, each as a test: tolerance, bootstrap, inferred support, the token
rate's estimand, flattened tokens, small slices and multiplicity; plus streamed input, student outputs, the
training record of teacher weights, margins and the report's wording."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from safekd import constraints as C
from safekd.auditing import audit, to_html, to_markdown, validate_report_dict
from safekd.auditing.bounds import BETTING, BOOTSTRAP, CLOPPER_PEARSON
from safekd.auditing.report import NOT_BOUNDED, NOT_CERTIFIED, format_confidence
from safekd.spec import Spec, TeacherSpec


class Identity(nn.Module):
    def forward(self, x):
        return x


def flagged(logits, batch):
    """One 0/1 outcome per example: the student predicts class 1."""
    return (logits[..., :2].argmax(-1) == 1).sum().to(logits.dtype), torch.ones_like(logits[..., 0]).sum()


def raw_value(logits, batch):
    """A per-example number read from column 2 (e.g. a KL or a cost)."""
    return logits[..., 2].sum(), torch.ones_like(logits[..., 2]).sum()


def spec_of(*constraints):
    return Spec(teachers=[TeacherSpec("t")], constraints=list(constraints))


def rows(n_flagged, n, values=None, seed=0):
    x = torch.zeros(n, 3, dtype=torch.float64)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_flagged]
    x[idx, 1] = 1.0
    if values is not None:
        x[:, 2] = torch.as_tensor(values, dtype=torch.float64)
    return {"inputs": x}


def test_case1_tolerance_does_not_widen_the_audited_threshold():
    c = C.metric(flagged, "<=", 0.04, tolerance=0.02, support="binary", name="unsafe")
    r = audit(Identity(), rows(40, 1000), spec_of(c))
    res = r.constraint("unsafe")
    assert res.bound_method == CLOPPER_PEARSON and res.bound == pytest.approx(stats.beta.ppf(0.95, 41, 960))
    assert res.bound == pytest.approx(0.0516, abs=5e-4)  # > 0.04: FAIL despite the tolerance
    assert not r.passed and res.status == "fail" and res.slack == pytest.approx(0.04 - res.bound)
    assert res.tolerance == 0.02 and "tolerance 0.02 (training only)" in to_markdown(r)


def test_case2_bootstrap_never_certifies_an_unbounded_metric():
    values = np.random.default_rng(0).lognormal(-3, 1.5, 400)  # skewed, KL-like, mean far below the threshold
    r = audit(Identity(), rows(0, 400, values), spec_of(C.metric(raw_value, "<=", 5.0, name="kl")), seed=4,
              resamples=300)
    res = r.constraint("kl")
    assert res.bound_method == BOOTSTRAP and res.bound < 5.0
    assert res.status == NOT_CERTIFIED and not res.passed and not r.passed
    assert (res.seed, res.resamples) == (4, 300) and res.support == "undeclared (unbounded)"
    assert "not certified" in r.message and "NOT CERTIFIED" in r.summary_table()
    # declaring the support makes the same values certifiable
    r2 = audit(Identity(), rows(0, 400, values), spec_of(C.metric(raw_value, "<=", 5.0, name="kl",
                                                                   support=(0.0, 50.0))))
    assert r2.constraint("kl").bound_method == BETTING and r2.passed


def test_case3_support_is_declared_never_inferred_from_observed_values():
    x = np.zeros(100)  # a rare 50 did not show up in this sample: every value looks like a 0/1 rate
    r = audit(Identity(), rows(0, 100, x), spec_of(C.metric(raw_value, "<=", 0.3, name="cost")))
    assert r.constraint("cost").status == NOT_CERTIFIED and r.constraint("cost").bound_method == BOOTSTRAP
    r = audit(Identity(), rows(0, 100, x), spec_of(C.metric(raw_value, "<=", 0.3, name="cost", support=(0, 50))))
    assert r.constraint("cost").bound_method == BETTING and r.constraint("cost").bound > 0.05  # 50× wider scale
    x[3] = 50.0
    with pytest.raises(ValueError, match=r"'cost'.*outside its declared support binary"):
        audit(Identity(), rows(0, 100, x), spec_of(C.metric(raw_value, "<=", 0.3, name="cost", support="binary")))


def _sequences(n=60, T=12, seed=0):
    """Token data with variable lengths; short sequences are the unsafe ones (class 1 predicted)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    p = torch.where(lengths <= 3, 0.8, 0.05)[:, None].expand(n, T)
    unsafe_tok = torch.rand(n, T, generator=g) < p
    labels = torch.zeros(n, T, dtype=torch.long)
    logits = torch.nn.functional.one_hot(unsafe_tok.long(), 3).double() * 5.0
    return {"inputs": logits, "labels": labels, "mask": mask}


def test_case4_token_rates_are_bounded_as_ratio_of_sums():
    data = _sequences()
    c = C.retain("accuracy", 0.5)  # 0/1 per token; the estimand is Σ correct / Σ counted tokens
    r = audit(Identity(), data, spec_of(c))
    res = r.constraint("retain(accuracy)")
    ms = c.measure_batch(data["inputs"], data)  # the training measurement on the whole set
    assert res.estimate == pytest.approx(float(ms.value_sum / ms.count), abs=1e-12)
    per_seq = ((data["inputs"].argmax(-1) == 0) & data["mask"]).sum(1) / data["mask"].sum(1)
    assert abs(float(per_seq.mean()) - res.estimate) > 0.05  # the mean of per-sequence rates is another number
    assert res.bound_method == BETTING and res.estimand.startswith("ratio of sums") and res.unit == "example"
    assert res.n == 60 and res.bound <= res.estimate


def test_case5_flattened_tokens_carry_their_group():
    data = _sequences()
    n, T = data["mask"].shape
    c = C.retain("accuracy", 0.5)
    seq = audit(Identity(), data, spec_of(c)).constraint("retain(accuracy)")
    flat = {"inputs": data["inputs"].reshape(n * T, 1, 3), "labels": data["labels"].reshape(n * T, 1),
            "mask": data["mask"].reshape(n * T, 1), "group_ids": torch.arange(n).repeat_interleave(T)}
    r = audit(Identity(), flat, spec_of(c), batch_size=100)  # groups cross batch boundaries
    grouped = r.constraint("retain(accuracy)")
    assert grouped.n == n and grouped.unit == "group (group_ids)" and r.metrics["units"] == n
    assert grouped.bound == pytest.approx(seq.bound, abs=1e-12) and grouped.estimate == pytest.approx(seq.estimate)
    # per-token group ids: two sequences per row
    two = {"inputs": data["inputs"].reshape(n // 2, 2 * T, 3), "labels": data["labels"].reshape(n // 2, 2 * T),
           "mask": data["mask"].reshape(n // 2, 2 * T),
           "group_ids": torch.arange(n).repeat_interleave(T).reshape(n // 2, 2 * T)}
    per_token = audit(Identity(), two, spec_of(c), batch_size=7).constraint("retain(accuracy)")
    assert per_token.n == n and per_token.bound == pytest.approx(seq.bound, abs=1e-12)
    # without group_ids every flattened row would count as an independent unit: a much tighter, invalid bound
    alone = audit(Identity(), {k: v for k, v in flat.items() if k != "group_ids"}, spec_of(c)).constraint(
        "retain(accuracy)")
    assert alone.n > 5 * n and alone.bound > seq.bound + 0.02


def test_case6_small_slices_are_listed_and_the_certified_column_is_corrected():
    n = 200
    data = rows(4, n)
    task = torch.zeros(n, dtype=torch.long)
    task[data["inputs"][:, 1] == 1] = 7  # the 4 flagged examples form their own slice: 100% unsafe
    task[:50][task[:50] == 0] = 1
    data["task_ids"] = task
    c = C.metric(flagged, "<=", 0.1, support="binary", name="unsafe")
    r = audit(Identity(), data, spec_of(c), slice_keys=("task_ids",), min_slice=5)
    res = r.constraint("unsafe")
    small = [s for s in res.slices if s.status == NOT_BOUNDED]
    assert [(s.value, s.n, s.estimate) for s in small] == [("7", 4, 1.0)]
    bounded = [s for s in res.slices if s.status != NOT_BOUNDED]
    assert len(bounded) == 2 and all(s.confidence == pytest.approx(1 - 0.05 / 2) for s in bounded)
    md, page = to_markdown(r), to_html(r)
    assert "Not bounded (n < min_slice): task_ids=7 (n=4, estimate 1.0000)" in md and "task_ids=7" in page
    assert "Bonferroni" in md and "Bonferroni" in page
    per_slice = audit(Identity(), data, spec_of(c), slice_keys=("task_ids",), slice_correction="none")
    assert all(s.confidence == 0.95 for s in per_slice.constraint("unsafe").slices if s.status != NOT_BOUNDED)
    # family error over 10 slices at the threshold: uncorrected ≈ 1 − 0.95^10, Bonferroni ≤ α
    k = np.random.default_rng(6).binomial(50, 0.1, size=(4000, 10))
    for conf, limit in ((0.95, None), (1 - 0.05 / 10, 0.05)):
        any_cert = (stats.beta.ppf(conf, k + 1, 50 - k) <= 0.1).any(1).mean()
        assert any_cert > 0.12 if limit is None else any_cert <= limit + 3 * math.sqrt(0.05 * 0.95 / 4000)


def test_simultaneous_bounds_use_alpha_over_m_and_say_so():
    cons = [C.metric(flagged, "<=", 0.2, support="binary", name="a"),
            C.metric(raw_value, "<=", 0.5, support=(0, 1), name="b")]
    data = rows(5, 300, np.full(300, 0.1))
    plain, simul = audit(Identity(), data, spec_of(*cons)), audit(Identity(), data, spec_of(*cons), simultaneous=True)
    assert "intersection–union" in plain.message and "not simultaneous" in plain.message
    assert "simultaneous bounds" in simul.message and simul.simultaneous
    for name in ("a", "b"):
        assert simul.constraint(name).confidence == pytest.approx(0.975)
        assert simul.constraint(name).bound > plain.constraint(name).bound


def test_streamed_batches_give_the_in_memory_report_and_errors_name_the_batch():
    data = _sequences(n=40)
    data["task_ids"] = torch.arange(40) % 3
    spec = spec_of(C.retain("accuracy", 0.5), C.unsafe_rate(0.5, unsafe=[1]))
    whole = audit(Identity(), data, spec, batch_size=16)
    chunks = [{k: v[s:s + 9] for k, v in data.items()} for s in range(0, 40, 9)]
    streamed = audit(Identity(), (b for b in chunks), spec)
    for a, b in zip(whole.constraints, streamed.constraints):
        assert (a.estimate, a.bound, a.n) == pytest.approx((b.estimate, b.bound, b.n), abs=1e-12)
        assert [s.bound for s in a.slices] == pytest.approx([s.bound for s in b.slices], nan_ok=True)
    bad = [dict(c) for c in chunks]
    bad[2]["inputs"] = bad[2]["inputs"].clone()
    bad[2]["inputs"][0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"data\['inputs'\] contains NaN or inf \(audit batch 2\)"):
        audit(Identity(), bad, spec)
    mixed = [dict(chunks[0], group_ids=torch.arange(9)), chunks[1]]
    with pytest.raises(ValueError, match="group_ids"):
        audit(Identity(), mixed, spec)
    with pytest.raises(ValueError, match="empty"):
        audit(Identity(), [], spec)


class _HFLike(nn.Module):
    def forward(self, x):
        return {"logits": x, "hidden_states": None}  # a ModelOutput is a mapping with .logits


class _Tuple(nn.Module):
    def forward(self, x):
        return (x,)


def test_model_outputs_are_unwrapped_or_named():
    data = rows(3, 50)
    spec = spec_of(C.metric(flagged, "<=", 0.3, support="binary", name="u"))
    assert audit(_HFLike(), data, spec).constraint("u").count == 3
    with pytest.raises(TypeError, match=r"safekd\.LogitsOf"):
        audit(_Tuple(), data, spec)


def test_teacher_weight_rows_check_the_training_record(tmp_path):
    from test_audit_core import Identity as Id, make_data, make_spec

    spec, data = make_spec(), make_data(0.0)
    plain = audit(Id(), data, spec).constraint("cap(bad)")
    assert plain.passed and "spec's projection of the audit data" in plain.source and "not a record" in plain.source
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(json.dumps({"step": s, "weights": {"projected": {"good": 0.75, "bad": 0.25}}}) + "\n"
                           for s in range(1, 4)))
    r = audit(Id(), data, spec, step_log=str(log))
    cap = r.constraint("cap(bad)")
    assert not cap.passed and "violated during training" in cap.source and "0.25" in cap.source
    assert "cap(bad)" in r.message
    validate_report_dict(json.loads(r.to_json()))


def test_margin_moves_the_training_residual_not_the_audit():
    c = C.unsafe_rate(0.1, unsafe=[1], margin=0.03)
    assert c.train_threshold == pytest.approx(0.07) and float(c.residual(0.08)) == pytest.approx(0.01)
    assert C.retain("accuracy", 0.9, margin=0.02).residual(0.91) == pytest.approx(0.01)
    assert c.to_dict()["margin"] == 0.03
    with pytest.raises(ValueError, match="margin"):
        C.unsafe_rate(0.1, margin=-0.1)
    with pytest.raises(ValueError, match="support"):
        C.metric(flagged, "<=", 0.1, support=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"'m'.*two numbers"):
        C.metric(flagged, "<=", 0.1, support=("a", 1), name="m")
    r = audit(Identity(), rows(0, 50), spec_of(C.metric(flagged, "<=", 0.1, support="binary", margin=0.05, name="m")))
    assert r.constraint("m").train_threshold == pytest.approx(0.05) and r.constraint("m").threshold == 0.1
    assert "train threshold 0.05" in to_markdown(r)


def test_renderers_print_integers_and_exact_confidence():
    r = audit(Identity(), rows(0, 450), spec_of(C.metric(flagged, "<=", 0.1, support="binary", name="u")),
              confidence=0.999)
    md = to_markdown(r)
    assert "| examples | 450 |" in md and "450.0000" not in md
    assert "99.9%" in md and "100%" not in md and "99.9%" in to_html(r)
    assert format_confidence(0.95) == "95%" and format_confidence(0.99999) == "99.999%"
    assert format_confidence(1 - 1e-9) != "100%"


def test_cli_plan_prints_units_and_rejects_bad_requests(capsys, tmp_path):
    from pathlib import Path

    from safekd.cli import main

    assert main(["audit", "--plan", "--threshold", "0.04", "--expected-rate", "0.02"]) == 0
    assert "452 held-out units" in capsys.readouterr().out
    assert main(["audit", "--plan", "--threshold", "0.01", "--expected-rate", "0.02"]) == 2
    assert "strictly inside" in capsys.readouterr().err
    job = Path(__file__).parents[1] / "safekd" / "data" / "digits_demo.yaml"
    assert main(["audit", "--plan", "--spec", str(job)]) == 2  # no margin, no expected rate: says what to give
    assert "no training margin" in capsys.readouterr().err
    assert main(["audit", "--plan", "--spec", str(job), "--expected-rate", "0.02", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["forbidden_fpr"]["units"] == 452
    assert main(["audit"]) == 2 and "--spec and --checkpoint" in capsys.readouterr().err


def test_monitor_observes_a_student_on_held_out_batches():
    from safekd.auditing import ConstraintMonitor

    c = C.metric(flagged, "<=", 0.2, support="binary", name="u")
    mon = ConstraintMonitor(spec_of(c), confidence=0.95, grid_points=200)
    for seed in range(4):
        mon.observe(Identity(), rows(2, 100, seed=seed))  # 2% flagged, fresh rows each look
    s = mon.status()["u"]
    assert s.n == 400 and s.estimate == pytest.approx(0.02) and s.lower <= 0.02 <= s.upper
    assert s.status == "certified" and mon.all_certified and mon.failing == []
    with pytest.raises(ValueError, match="group_ids"):
        mon.observe(Identity(), {**rows(2, 10), "group_ids": torch.arange(10)})


def test_declared_max_unit_count_scales_ratio_bounds():
    data = _sequences()
    c = C.retain("accuracy", 0.5)
    auto = audit(Identity(), data, spec_of(c)).constraint("retain(accuracy)")
    declared = audit(Identity(), data, spec_of(c), max_unit_count=64).constraint("retain(accuracy)")
    assert "read from the data" in auto.description and "declared max_unit_count 64" in declared.description
    assert declared.bound < auto.estimate and declared.bound != auto.bound
    with pytest.raises(ValueError, match="max_unit_count 4"):
        audit(Identity(), data, spec_of(c), max_unit_count=4)
