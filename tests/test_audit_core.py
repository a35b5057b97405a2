"""audit(): student constraints measured by the training code with exact bounds, slices, teacher-weight checks."""
import json
import math
from html.parser import HTMLParser

import pytest
import torch
from scipy import stats
from torch import nn

from safekd import constraints as C
from safekd.auditing import audit, to_html, validate_report_dict
from safekd.auditing.bounds import BETTING, BOOTSTRAP, CLOPPER_PEARSON
from safekd.auditing.core import EXHAUSTIVE
from safekd.auditing.measure import per_example_sums
from safekd.auditing.provenance import read_traces
from safekd.spec import Spec

V, F_CLS, N = 4, 3, 400


def fpr(logits, batch):
    neg = batch["labels"] != F_CLS
    return ((logits.argmax(-1) == F_CLS) & neg).sum().to(logits.dtype), neg.sum().to(logits.dtype)


fpr.support = "binary"  # one 0/1 outcome per counted example


def fpr_proxy(logits, batch):
    neg = batch["labels"] != F_CLS
    return (torch.softmax(logits, -1)[..., F_CLS] * neg).sum(), neg.sum().to(logits.dtype)


def wrong_mask(batch, vocab):
    return (torch.arange(vocab) == F_CLS) & (batch["labels"] != F_CLS).unsqueeze(-1)


FUNCS = {"fpr": fpr, "fpr_proxy": fpr_proxy, "wrong_mask": wrong_mask}


def make_spec(fpr_max=0.05, extra=()):
    return Spec.from_dict({
        "teachers": [{"name": "good", "safety": 1.0}, {"name": "bad", "safety": 0.0}],
        "unsafe": {"fn": "wrong_mask"},
        "constraints": [
            {"kind": "cap", "teacher": "bad", "max": 0.2},
            {"kind": "unsafe_mass", "name": "target_mass", "max": 0.3},
            {"kind": "metric", "name": "fpr", "fn": "fpr", "proxy": "fpr_proxy", "sense": "<=", "threshold": fpr_max},
            {"kind": "retain", "metric": "accuracy", "min": 0.8},
            {"kind": "unsafe_rate", "name": "p_unsafe", "max": 0.1},
            *extra,
        ]}, functions=FUNCS)


def make_data(fp_rate, seed=0):
    """Inputs ARE the student's logits (student = identity), so the student's predictions are set exactly."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    pred = labels.clone()
    flip = (torch.rand(N, generator=g) < fp_rate) & (labels != F_CLS)
    pred[flip] = F_CLS
    logits = torch.nn.functional.one_hot(pred, V).double() * 4.0
    good = torch.nn.functional.one_hot(labels, V).double() * 5.0
    bad = good.clone()
    bad[:, F_CLS] += 6.0  # the bad teacher over-predicts the forbidden class
    return {"inputs": logits, "labels": labels, "teacher_logits": torch.stack([good, bad], 1),
            "task_ids": torch.arange(N) % 3}


class Identity(nn.Module):
    def forward(self, x):
        return x


def test_student_constraints_use_training_measurement_and_exact_bounds():
    data = make_data(0.01)
    spec = make_spec()
    r = audit(Identity(), data, spec, batch_size=64)
    for c in spec.student_constraints:
        ms = c.measure_batch(data["inputs"], data, unsafe=spec.unsafe)  # the training code on the whole set
        res = r.constraint(c.name)
        assert res.estimate == pytest.approx(float(ms.value_sum / ms.count), abs=1e-12)
        assert res.n == int(ms.count)
    f = r.constraint("fpr")
    assert f.bound_method == CLOPPER_PEARSON and f.kind == "student"
    ci = stats.binomtest(int(f.count), f.n).proportion_ci(confidence_level=0.90, method="exact")
    assert f.bound == pytest.approx(ci.high, abs=1e-12)
    assert f.slack == pytest.approx(0.05 - f.bound) and f.passed == (f.bound <= 0.05)
    acc = r.constraint("retain(accuracy)")
    assert acc.direction == ">=" and acc.bound_method == CLOPPER_PEARSON
    assert acc.bound == pytest.approx(stats.binomtest(int(acc.count), acc.n).proportion_ci(0.90, "exact").low)
    assert r.constraint("p_unsafe").bound_method == BETTING  # expected probability: a mean in [0, 1]
    assert r.metrics["accuracy"] == pytest.approx(acc.estimate)


def test_violating_student_fails_and_is_named():
    r = audit(Identity(), make_data(0.15), make_spec(), batch_size=100)
    assert not r.passed
    assert "fpr" in [c.name for c in r.failed] and "fpr" in r.message
    f = r.constraint("fpr")
    assert f.estimate > 0.1 and f.slack < 0
    # worst slices first, every slice bounded on its own examples
    slacks = [s.slack for s in f.slices]
    assert slacks == sorted(slacks) and {s.key for s in f.slices} == {"task_ids", "labels"}
    assert sum(s.n for s in f.slices if s.key == "task_ids") == f.n
    assert all(s.value != str(F_CLS) for s in f.slices if s.key == "labels")  # no negatives in the f-slice


def test_teacher_weight_constraints_checked_on_every_token():
    data = make_data(0.02)
    r = audit(Identity(), data, make_spec(), batch_size=128)
    cap, mass = r.constraint("cap(bad)"), r.constraint("target_mass")
    assert cap.bound_method == mass.bound_method == EXHAUSTIVE
    assert cap.kind == "teacher_weight" and mass.kind == "target"
    assert cap.n == mass.n == N and cap.passed and mass.passed
    assert cap.estimate <= 0.2 + 1e-6 and mass.estimate <= 0.3 + 1e-6
    tw = r.teacher_weights
    assert tw.teachers == ["good", "bad"] and tw.total_tokens == N
    assert tw.mean_weight["final"][1] <= 0.2 + 1e-6
    assert sum(tw.mean_weight["final"]) == pytest.approx(1.0)
    assert tw.by_slice["labels"]["values"] == ["0", "1", "2", "3"]
    assert set(tw.active_fraction) <= {"cap(bad)", "target_mass"} and tw.active_fraction


def test_kl_without_support_is_not_certified_and_cannot_pass():
    spec = make_spec(extra=({"kind": "kl_to", "teacher": "good", "max": 5.0},))
    r = audit(Identity(), make_data(0.0), spec, seed=3, resamples=500)
    kl = r.constraint("kl_to(good)")
    assert kl.bound_method == BOOTSTRAP and kl.bound >= kl.estimate > 0 and kl.bound < 5.0
    assert kl.status == "not certified" and not kl.passed and not r.passed
    assert (kl.seed, kl.resamples) == (3, 500) and "not certified" in r.message


def test_per_example_sums_add_up_to_the_batch_measurement_for_token_data():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (6, 5), generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    batch = {"labels": labels, "mask": mask}
    for c in (C.retain("accuracy", 0.5), C.unsafe_rate(0.1, unsafe=[F_CLS])):
        v, n = per_example_sums(c, logits, batch)
        ms = c.measure_batch(logits, batch)
        assert v.shape == n.shape == (6,)
        assert float(v.sum()) == pytest.approx(float(ms.value_sum)) and float(n.sum()) == float(ms.count)
        assert n.tolist() == mask.sum(1).double().tolist()


def test_bad_inputs_raise_clear_errors():
    spec, data = make_spec(), make_data(0.0)
    with pytest.raises(ValueError, match=r"data\['labels'\] has 10 rows"):
        audit(Identity(), {**data, "labels": data["labels"][:10]}, spec)
    bad = data["inputs"].clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"data\['inputs'\] contains NaN"):
        audit(Identity(), {**data, "inputs": bad}, spec)
    no_teachers = {k: v for k, v in data.items() if k != "teacher_logits"}
    with pytest.raises(ValueError, match="need teacher outputs"):
        audit(Identity(), no_teachers, spec)
    with pytest.raises(ValueError, match="confidence"):
        audit(Identity(), data, spec, confidence=1.5)


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.chunks = []

    def handle_data(self, data):
        self.chunks.append(data)


def test_report_with_traces_validates_and_renders(tmp_path):
    log = tmp_path / "steps.jsonl"
    with log.open("w") as fh:
        for step in range(1, 31):
            fh.write(json.dumps({"step": step, "loss": 1.0 / step, "kd_loss": 1.0 / step, "penalty": 0.0,
                                 "constraints": {"fpr": {"sense": "<=", "threshold": 0.05, "value": 0.3 / step,
                                                         "residual": 0.3 / step - 0.05, "multiplier": 0.01 * step,
                                                         "count": 50.0, "satisfied": step > 6}},
                                 "weights": {"projected": {"good": 0.8, "bad": 0.2}},
                                 "projection": {"tokens": 64, "active": {"cap(bad)": 10}, "relaxed_tokens": 0,
                                                "corrected_tokens": 0, "max_kkt_residual": 0.0},
                                 "alarms": [], "dual_updated": True, "reference_check": None}) + "\n")
    tr = read_traces(log, ["good", "bad"])
    assert tr["step"] == list(range(1, 31))
    assert tr["series"]["constraints/fpr/multiplier"][-1] == pytest.approx(0.3)
    assert "weights/projected/bad" in tr["series"] and "constraints/fpr/sense" not in tr["series"]
    spec = make_spec()
    r = audit(Identity(), make_data(0.15), spec, step_log=str(log), seed=7)
    d = json.loads(r.to_json())
    validate_report_dict(d)
    assert d["traces"]["series"]["loss"][0] == 1.0 and d["provenance"]["seed"] == 7
    p = _Text()
    p.feed(to_html(r))
    text = "".join(p.chunks)
    for c in spec.constraints:
        assert c.name in text
    assert text.count("FAIL") >= 2  # the verdict and the failing fpr row


def test_top_level_audit_is_the_function_after_submodule_imports():
    import importlib

    import safekd

    importlib.import_module("safekd.auditing.core")
    importlib.import_module("safekd.auditing.render")
    from safekd.auditing import audit as audit_fn

    assert safekd.audit is audit_fn and callable(safekd.audit)
