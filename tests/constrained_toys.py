"""Small convex constrained-KD problems shared by the dual-dynamics tests (cooper parity, augmented Lagrangian,
alarm suite): a tabular student over C contexts and V classes distilled from one fixed teacher q under
mean p_θ(U) ≤ ε, convex in p (so cvxpy gives the exact KKT multiplier)."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import torch

from safekd import constraints as C
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec

NO_CHECKS = ChecksSpec(reference_every=0, alarm_window=0)


class Table(torch.nn.Module):
    """Tabular student: logits θ[x] for context ids x (θ starts at 0, the uniform distribution)."""

    def __init__(self, C: int, V: int, frozen: list[int] | None = None) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(C, V, dtype=torch.float64))
        keep = torch.ones(V, dtype=torch.float64)
        if frozen:
            keep[frozen] = 0.0  # these logits never move (an unattainable constraint on them stays unattainable)
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.theta * self.keep)[x]


def toy_data(C: int = 16, V: int = 6, seed: int = 0, unsafe_bias: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(C, V, generator=g, dtype=torch.float64)
    z[:, 0] += unsafe_bias  # the teacher likes the unsafe class 0
    return {"inputs": torch.arange(C), "teacher_logits": torch.log_softmax(z, -1).unsqueeze(1)}


def kkt_multiplier(data: dict[str, torch.Tensor], eps: float, unsafe: tuple[int, ...] = (0,)) -> float:
    """λ* of min mean KL(q‖p) s.t. mean p(U) ≤ ε over tabular p (convex in p), by cvxpy/Clarabel."""
    q = data["teacher_logits"][:, 0].exp().numpy()
    P = cp.Variable(q.shape, nonneg=True)
    con = cp.sum(P[:, list(unsafe)]) / q.shape[0] <= eps
    obj = -cp.sum(cp.multiply(q, cp.log(P))) / q.shape[0]
    cp.Problem(cp.Minimize(obj), [cp.sum(P, axis=1) == 1, con]).solve(
        solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return float(con.dual_value)


def toy_spec(eps: float = 0.05, *, dual: DualSpec | None = None, checks: ChecksSpec = NO_CHECKS,
             extra: tuple = ()) -> Spec:
    return Spec(teachers=[TeacherSpec("t")], constraints=[C.unsafe_rate(eps), *extra], unsafe=[0],
                dual=dual or DualSpec(lr=0.5), checks=checks)


def mean_unsafe(theta: torch.Tensor, unsafe: tuple[int, ...] = (0,)) -> torch.Tensor:
    return torch.softmax(theta, -1)[:, list(unsafe)].sum(-1).mean()


def feasible_gap(data, eps):
    """True when the unconstrained optimum (p = q) violates the constraint (so it is active)."""
    return float(data["teacher_logits"][:, 0, 0].exp().mean()) > eps





def margin_problem(dual: DualSpec, mu: float = 0.1, b: float = -0.3):
    """Softmax regression on a fixed target under one linear constraint (mean logit margin ≤ b) with ℓ2 weight decay
    μ: returns (distiller, batch, cvxpy θ*, cvxpy λ*). Convex in θ, the constraint is active at the optimum."""
    from safekd.distiller import SafeDistiller

    g = torch.Generator().manual_seed(0)
    N, F, V = 40, 4, 3
    X = torch.randn(N, F, generator=g, dtype=torch.float64)
    q = torch.softmax(1.5 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)

    def margin(logits, batch):
        return (logits[:, 0] - logits[:, 1]).mean()

    th = cp.Variable((V, F))
    Z = X.numpy() @ th.T
    kl = cp.sum(cp.log_sum_exp(Z, axis=1) - cp.sum(cp.multiply(q.numpy(), Z), axis=1)) / N
    obj = kl + mu / 2 * cp.sum_squares(th)
    con = cp.sum(Z[:, 0] - Z[:, 1]) / N <= b
    cp.Problem(cp.Minimize(obj), [con]).solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    lin = torch.nn.Linear(F, V, bias=False).double()
    torch.nn.init.zeros_(lin.weight)
    spec = Spec(teachers=[TeacherSpec("t")], constraints=[C.metric(margin, "<=", b, name="margin")], dual=dual,
                checks=NO_CHECKS)
    d = SafeDistiller(lin, None, torch.optim.SGD(lin.parameters(), lr=1.0, weight_decay=mu), spec)
    return d, {"inputs": X, "teacher_logits": q.log().unsqueeze(1)}, th.value, float(con.dual_value)


# ---------------------------------------------------------------- a tiny spec'd job (factories named in a job file)
def job_splits(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """64 examples over the toy's 16 contexts per split, teacher logits cached (one teacher)."""
    data = toy_data(seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split in ("distill", "heldout"):
        x = torch.randint(0, 16, (64,), generator=g)
        out[split] = {"inputs": x, "labels": torch.randint(0, 6, (64,), generator=g),
                      "teacher_logits": data["teacher_logits"][x].float()}
    return out


def job_teachers(splits, seed: int = 0, device=None):
    logits = toy_data(seed=seed)["teacher_logits"][:, 0].float()
    return {"t": lambda x: logits[x]}


def job_student(seed: int = 0) -> torch.nn.Module:
    """Embedding → dropout → linear: the dropout draws from the global RNG, so resuming must restore it."""
    return torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 6))
