import pytest
import torch

from solvers import FeasibleSet


def test_constructors_build_rows_and_bounds():
    fs = (FeasibleSet.simplex(4, dtype=torch.float64).cap(0, 0.3, name="cap(a)").floor(1, 0.05, name="floor(b)")
          .group_cap([0, 2], 0.6, name="group").halfspace([1.0, 0, 0, 1.0], 0.5, name="unsafe").order(1, 2, name="o"))
    assert fs.num_rows == 3 and fs.row_names == ("group", "unsafe", "o")
    assert fs.upper[0] == 0.3 and fs.lower[1] == 0.05 and fs.upper_names[0] == "cap(a)"
    w = torch.tensor([0.25, 0.3, 0.2, 0.25], dtype=torch.float64)
    assert torch.allclose(fs.residual(w), torch.tensor([0.45 - 0.6, 0.0, -0.1], dtype=torch.float64))
    assert bool(fs.contains(w))
    assert not bool(fs.contains(torch.tensor([0.5, 0.1, 0.1, 0.3], dtype=torch.float64)))
    assert fs.constraint_names()[-1] == "sum(w)=1"


def test_batched_halfspace_and_order_by_ties():
    a = torch.rand(5, 3, 4)
    fs = FeasibleSet.simplex(4).halfspace(a, torch.full((5, 3), 0.5), name="u").order_by([3.0, 1.0, 1.0, 2.0], name="s")
    assert fs.batch_shape == (5, 3) and fs.num_rows == 4
    # order 0 > 3 > {1, 2} tied: rows w3-w0<=0, w1-w3<=0, and a zero row for the tie
    assert torch.equal(fs.A[0, 0, 1], torch.tensor([-1.0, 0, 0, 1.0]))
    assert torch.equal(fs.A[0, 0, 3], torch.zeros(4))
    assert fs.expand((5, 3)).A.shape == (5, 3, 4, 4)
    assert fs[2, 1].batch_shape == ()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: FeasibleSet.simplex(3).cap(0, float("nan")), "value"),
        (lambda: FeasibleSet.simplex(3).floor(0, 0.5).cap(0, 0.2), "lower > upper"),
        (lambda: FeasibleSet.simplex(3).halfspace([1.0, 2.0], 0.1), "a must have shape"),
        (lambda: FeasibleSet.simplex(3).cap(7, 0.1), "coordinate index"),
        (lambda: FeasibleSet.simplex(3).halfspace([1.0, 0, 0], 0.1, name="x").halfspace([0, 1.0, 0], 0.2, name="x"), "already used"),
        (lambda: FeasibleSet(torch.zeros(3), torch.ones(3), torch.zeros(1, 3), torch.zeros(2), ("r",)), "b must have shape"),
    ],
)
def test_validation_names_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_to_changes_dtype():
    fs = FeasibleSet.simplex(3).cap(1, 0.5).to(dtype=torch.float64)
    assert fs.A.dtype == fs.lower.dtype == torch.float64
