"""Validate first, mutate after: load_state_dict refuses a bad state without touching anything; the reference check
runs before the step (a disagreement stops it with nothing changed; a failing reference solver is reported and
re-checked on the next step, never raised from inside a step)."""
import pytest
import torch

import solvers
from safekd import constraints as C
from safekd.distiller import ProjectionCheckError, SafeDistiller
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.weighting import ConfidenceSoftmax
from students import Student

V, K = 12, 3


def _make(checks=ChecksSpec(reference_every=0, alarm_window=0), d=8, seed=0):
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=[C.cap("risky", 0.2), C.unsafe_mass(0.3), C.unsafe_rate(0.05)], unsafe=[0, 1],
                dual=DualSpec(rule="nupi", lr=0.1, kp=0.5), checks=checks)
    torch.manual_seed(seed)
    student = Student(V, d)
    return SafeDistiller(student, None, torch.optim.Adam(student.parameters(), 1e-2), spec,
                         weighting=ConfidenceSoftmax(beta=3.0))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(0, V, (2, 6), generator=g),
            "teacher_logits": 2 * torch.randn(2, 6, K, V, generator=g)}


def _flat(state):
    """Every tensor of a (nested) state, by path, cloned."""
    out = {}
    def walk(x, path):
        if isinstance(x, torch.Tensor):
            out[path] = x.detach().clone()
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
    walk(state, "")
    return out


def _assert_unchanged(d, before, step):
    after = _flat(d.state_dict())
    assert before.keys() == after.keys() and d.step_count == step
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("corrupt, msg", [
    (lambda s: s["student"].__setitem__("out.bias", torch.zeros(V + 1)), r"student\['out.bias'\] has shape \(13,\)"),
    (lambda s: s["student"].pop("emb.weight"), r"missing keys \['emb.weight'\]"),
    (lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3)), r"state 'exp_avg' of parameter 0"),
    (lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "parameter groups of sizes"),
    (lambda s: s["multipliers"].__setitem__("unsafe_rate", torch.tensor(float("nan"))), "not a finite scalar"),
    (lambda s: s["relaxations"]["u"].__setitem__("unsafe_rate", torch.tensor(-1.0, dtype=torch.float64)), ">= 0"),
    (lambda s: s["weighting"].__setitem__("task", {}), r"weighting state for scale\(s\) \['task'\]"),
])
def test_load_state_dict_refuses_a_bad_state_and_changes_nothing(corrupt, msg):
    src = _make(seed=1)
    for i in range(3):
        src.step(_batch(i))
    state = src.state_dict()
    corrupt(state)
    d = _make()
    d.step(_batch(7))
    before = _flat(d.state_dict())
    with pytest.raises(ValueError, match=msg):
        d.load_state_dict(state)
    _assert_unchanged(d, before, 1)


def test_a_state_of_another_model_size_leaves_the_student_and_optimizer_alone():
    other = _make(d=16)
    other.step(_batch(0))
    d = _make()
    d.step(_batch(0))
    before = _flat(d.state_dict())
    with pytest.raises(ValueError, match=r"student\['emb.weight'\] has shape \(12, 16\), this model's is \(12, 8\)"):
        d.load_state_dict(other.state_dict())
    _assert_unchanged(d, before, 1)


def test_a_projection_disagreeing_with_the_reference_stops_the_step_before_anything_changes():
    d = _make(ChecksSpec(reference_every=1, reference_tol=0.0, alarm_window=0))
    before = _flat(d.state_dict())
    batch = _batch(0)
    batch["teacher_logits"] = batch["teacher_logits"] * 3  # confident teachers: the cap binds, rows are projected
    with pytest.raises(ProjectionCheckError, match="before any state changed"):
        # tolerance 0: any round-off difference with cvxpy counts as a disagreement
        for _ in range(5):
            d.step(batch)
            before, step = _flat(d.state_dict()), d.step_count
    _assert_unchanged(d, before, d.step_count)


def test_a_failing_reference_solver_is_reported_and_rechecked_not_raised(monkeypatch):
    d = _make(ChecksSpec(reference_every=3, alarm_window=0))
    real = solvers.reference.project
    calls = []

    def flaky(*args, **kwargs):  # fault injection: the reference solver fails once
        calls.append(1)
        if len(calls) == 1:
            raise solvers.SolverError("cvxpy solver CLARABEL failed: injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(solvers.reference, "project", flaky)
    batch = _batch(0)
    batch["teacher_logits"] = batch["teacher_logits"] * 3
    recs = [d.step(batch) for _ in range(4)]
    assert [r.reference_check is not None for r in recs] == [False, False, True, True]  # step 3 failed → step 4
    assert recs[2].reference_check["rows"] == 0 and "injected" in recs[2].reference_check["error"]
    assert recs[3].reference_check["rows"] > 0 and recs[3].reference_check["max_abs_diff"] < 1e-5
    assert d.step_count == 4
