import pytest
import torch

from solvers.multipliers import AugmentedLagrangian, GradientAscent, NuPI


def test_gradient_ascent_projects_nonneg():
    lam = torch.tensor([0.5, 0.1])
    opt = GradientAscent([lam], lr=1.0)
    lam.grad = torch.tensor([0.2, -0.3])
    opt.step()
    assert torch.allclose(lam, torch.tensor([0.7, 0.0]))


def test_nupi_pi_update_and_state_roundtrip():
    lam = torch.zeros(1)
    opt = NuPI([lam], lr=0.5, kp=2.0, ki=1.0, ema_nu=0.0)
    for g, want in ((1.0, 0.5 * (1 + 2 * 1)), (0.5, None)):
        lam.grad = torch.tensor([g])
        opt.step()
        if want is not None:
            assert lam.item() == pytest.approx(want)
    # second step: λ += lr (ki g + kp (g - g_prev)) = 1.5 + 0.5 (0.5 - 1.0) = 1.25
    assert lam.item() == pytest.approx(1.25)
    lam2 = torch.zeros(1)
    opt2 = NuPI([lam2], lr=0.5, kp=2.0)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[lam2]["xi"], opt.state[lam]["xi"])
    with pytest.raises(ValueError, match="ema_nu"):
        NuPI([lam], lr=0.1, kp=1.0, ema_nu=1.0)


def test_augmented_lagrangian_grows_penalty_when_violation_stalls():
    lam = torch.zeros(2)
    opt = AugmentedLagrangian([lam], penalty=1.0, growth=2.0, max_penalty=3.0, patience=1)
    for g in ([1.0, 1.0], [1.0, 0.1], [1.0, 0.0]):
        lam.grad = torch.tensor(g)
        opt.step()
    assert opt.penalty_coefficient(0).tolist() == [3.0, 1.0]  # capped at max_penalty; shrinking entry kept
    assert lam.tolist() == pytest.approx([1 + 1 + 2, 1.1])  # λ uses ρ before it grows
    with pytest.raises(ValueError, match="penalty"):
        AugmentedLagrangian([lam], penalty=0.0)
    with pytest.raises(ValueError, match="patience"):
        AugmentedLagrangian([lam], patience=0)


def test_augmented_lagrangian_penalty_checked_every_patience_steps():
    lam = torch.zeros(1)
    opt = AugmentedLagrangian([lam], penalty=1.0, growth=2.0, max_penalty=8.0, patience=3)
    rhos = []
    for _ in range(9):  # a violation that never shrinks: ρ grows at the 2nd and 3rd checks (steps 6 and 9) only
        lam.grad = torch.ones(1)
        opt.step()
        rhos.append(float(opt.penalty_coefficient(0)))
    assert rhos == [1.0] * 5 + [2.0] * 3 + [4.0]
