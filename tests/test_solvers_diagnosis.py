import pytest
import torch

from solvers import FeasibleSet, InfeasibleError, Status, diagnose, require_feasible


def test_caps_conflict_names_minimal_subset():
    fs = (FeasibleSet.simplex(4, dtype=torch.float64).cap(0, 0.1, name="cap(teacher_a)").cap(1, 0.1, name="cap(teacher_b)")
          .cap(2, 0.1, name="cap(teacher_c)").cap(3, 0.1, name="cap(teacher_d)").floor(0, 0.05, name="floor(a)"))
    d = diagnose(fs)
    assert not d.success and d.status == Status.INFEASIBLE
    assert set(d.conflict) == {"cap(teacher_a)", "cap(teacher_b)", "cap(teacher_c)", "cap(teacher_d)", "sum(w)=1"}
    assert "sum to 0.4 < 1" in d.message
    with pytest.raises(InfeasibleError, match="cap\\(teacher_a\\)") as exc:
        require_feasible(fs)
    assert exc.value.diagnosis.conflict == d.conflict


def test_row_conflict_and_batch_index():
    fs = FeasibleSet.simplex(3, dtype=torch.float64).halfspace([1.0, 0, 0], torch.tensor([0.5, 0.0]), name="u") \
        .order(0, 1, name="w0>=w1").order(0, 2, name="w0>=w2")
    d = diagnose(fs)
    assert d.index == (1,) and d.feasible.tolist() == [True, False]
    assert set(d.conflict) == {"u", "w0>=w1", "w0>=w2", "sum(w)=1"}


def test_feasible_reports_slater_point():
    fs = FeasibleSet.simplex(3, dtype=torch.float64).cap(0, 0.5, name="c")
    d = require_feasible(fs)
    assert d.success and d.slack > 0 and bool(fs.contains(d.interior_point, tol=1e-9))
    tight = FeasibleSet.simplex(2, dtype=torch.float64).floor(0, 0.5, name="f0").floor(1, 0.5, name="f1")
    assert diagnose(tight).slack == pytest.approx(0.0, abs=1e-12)
