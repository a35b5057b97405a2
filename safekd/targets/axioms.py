"""Numerical axiom checker for weighting operators and pools (every checkable form is safekd's reconstruction).

`check_axioms(operator)` samples signals (random draws plus edge cases: one-hot, identical and uniform
teachers, extreme logits, safety ties) and reports, per axiom, pass/fail, the measured constant and the
worst witness with its seed:

* W1 normalization, W2 bounded influence (min/max weight, ratio), W3 continuity (Lipschitz estimate from
  random pairs and an adversarial ℓ∞ search, plus a jump test at radius 1e-7), W4 ordinal safety
  monotonicity in three readings (own-score, comonotone ceteris paribus, invariance to monotone re-scaling),
  W5 permutation equivariance, W6 scale separation, and composition closure (neutral uniform factor,
  order independence, ratio bounds multiply, ``‖Δw‖₁ ≤ 2·tanh(η/2)`` under log-factor perturbation η).

`check_pool(pool)` checks A1 simplex output / idempotence (hull membership reported apart), A2 positivity
inheritance (all / any), A3 continuity, A4 weight monotonicity (forward and reverse KL), A5 temperature
coherence (strong and weak forms apart). An axiom counts toward `AxiomReport.passed` only when the subject
declares it (``operator.declared(K).claims`` / ``pool.claims``); undeclared ones are measured and reported.
"""
from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from safekd.targets.divergences import kl_per_token
from safekd.targets.pooling import POOL_AXIOMS, soften
from safekd.common.references import import_reference
from safekd.targets.signals import SCALE_FIELDS, Signals
from safekd.targets.weighting.base import WeightOperator
from safekd.targets.weighting.compose import compose

logger = logging.getLogger(__name__)

__all__ = ["AxiomResult", "AxiomReport", "check_axioms", "check_pool", "check", "load_object", "sample_signals"]

_IDS = {
    "normalization": "W1", "bounded_influence": "W2", "continuity": "W3", "safety_own_score": "W4a",
    "safety_comonotone": "W4b", "safety_ordinal": "W4c", "permutation_equivariance": "W5",
    "scale_separation": "W6", "composition_closure": "C1",
    "simplex_output": "A1", "idempotence": "A1", "hull_membership": "A1-strong", "positivity_all": "A2",
    "positivity_any": "A2-strong", "continuity_pool": "A3", "weight_monotonicity_forward": "A4-fwd",
    "weight_monotonicity_reverse": "A4-rev", "temperature_coherence_strong": "A5-strong",
    "temperature_coherence_weak": "A5-weak",
}
_CASES = ("random", "random-sharp", "one-hot", "identical", "uniform", "extreme", "pair-tie")
_JUMP_RADIUS = 1e-7
_JUMP_TOL = 1e-3


@dataclass
class AxiomResult:
    """One axiom: ``passed`` (measured), ``declared`` (claimed by the subject), constants and witness; ``tag`` is
    the provenance of the checkable form (``"reconstruction"``: safekd's, as the Theory page explains)."""

    name: str
    axiom_id: str
    passed: bool
    declared: bool
    measured: dict[str, float] = field(default_factory=dict)
    witness: dict[str, Any] | None = None
    seed: int = 0
    message: str = ""
    tag: str = "reconstruction"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.axiom_id, "passed": self.passed, "declared": self.declared,
                "measured": self.measured, "witness": self.witness, "seed": self.seed, "message": self.message,
                "tag": self.tag}


@dataclass
class AxiomReport:
    """All axiom results for one subject; ``passed`` is True when every declared axiom holds."""

    subject: str
    kind: str
    results: list[AxiomResult]
    seed: int

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results if r.declared)

    @property
    def failures(self) -> list[AxiomResult]:
        """Declared axioms that failed."""
        return [r for r in self.results if r.declared and not r.passed]

    @property
    def unclaimed_failures(self) -> list[AxiomResult]:
        """Properties the subject does not declare and that do not hold (reported, never a failure)."""
        return [r for r in self.results if not r.declared and not r.passed]

    @property
    def message(self) -> str:
        if self.passed:
            head = f"{self.subject}: all {sum(r.declared for r in self.results)} declared axioms hold"
        else:
            head = f"{self.subject}: {len(self.failures)} declared axiom(s) FAILED: " + \
                ", ".join(r.name for r in self.failures)
        other = self.unclaimed_failures
        if other:
            head += (f"; {len(other)} property(ies) it does not declare do not hold (not a failure): "
                     + ", ".join(r.name for r in other))
        return head

    def __getitem__(self, name: str) -> AxiomResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no axiom {name!r} in report; have {[r.name for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "kind": self.kind, "passed": self.passed, "seed": self.seed,
                "message": self.message, "results": [r.to_dict() for r in self.results]}

    def to_text(self) -> str:
        """Human-readable report: message first, one line per axiom, witnesses of failures."""
        lines = [self.message, f"(kind={self.kind}, seed={self.seed}; the axioms' checkable forms are safekd's "
                               "reconstruction, see the Theory page of the documentation)"]
        for r in self.results:
            status = ("PASS" if r.passed else "FAIL") if r.declared else (" ok " if r.passed else " no ")
            scope = "declared" if r.declared else "measured only"
            consts = ", ".join(f"{k}={_fmt(v)}" for k, v in r.measured.items())
            lines.append(f"  [{status}] {r.axiom_id:<9} {r.name:<30} ({scope}) {consts}")
            if r.message:
                lines.append(f"           {r.message}")
            if r.witness is not None and not r.passed:
                lines.append(f"           witness (seed={r.seed}): {_short(r.witness)}")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _short(obj: Any, limit: int = 600) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def _round(t: Tensor) -> list:
    head = [round(float(x), 6) for x in t.reshape(-1)[:64]]
    return head if t.numel() <= 64 else head + ["..."]


# ---------------------------------------------------------------------------------------------- sampling
def _teacher_logits(B: int, K: int, V: int, g: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, list[str]]:
    """Teacher logits ``[B, K, V]`` cycling through the edge cases in ``_CASES``."""
    cases = [_CASES[i % len(_CASES)] for i in range(B)]
    out = torch.empty(B, K, V, dtype=dtype)
    for b, case in enumerate(cases):
        if case == "random":
            z = torch.randn(K, V, generator=g, dtype=dtype)
        elif case == "random-sharp":
            z = 4.0 * torch.randn(K, V, generator=g, dtype=dtype)
        elif case == "one-hot":
            idx = torch.randint(0, V, (K,), generator=g)
            z = torch.full((K, V), -1.0e3, dtype=dtype)
            z[torch.arange(K), idx] = 0.0
        elif case == "identical":
            z = torch.randn(1, V, generator=g, dtype=dtype).expand(K, V).clone()
        elif case == "uniform":
            z = torch.zeros(K, V, dtype=dtype)
        elif case == "extreme":
            z = 50.0 * torch.randn(K, V, generator=g, dtype=dtype)
        else:  # pair-tie: teachers 0 and 1 identical, the rest random
            z = torch.randn(K, V, generator=g, dtype=dtype)
            z[1] = z[0]
        out[b] = z
    return out, cases


def _find(op: Any, name: str, default: Any = None) -> Any:
    while op is not None:
        value = getattr(op, name, None)
        if value is not None:
            return value
        op = getattr(op, "base", None)
    return default


def sample_signals(operator: Any, num_teachers: int, batch: int = 56, vocab: int = 8, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> tuple[Signals, list[str]]:
    """Signals ``[batch]`` with every field filled (teacher logits through the edge cases) and the case names."""
    g = torch.Generator().manual_seed(seed)
    K, V, B = num_teachers, vocab, batch
    logits, cases = _teacher_logits(B, K, V, g, dtype)
    num_tasks = int(_find(operator, "num_tasks", 4))
    F = int(_find(operator, "context_dim", 3))
    if F == 1:  # an integer domain id (routing by context)
        context = torch.randint(0, 4, (B, 1), generator=g).to(dtype)
    else:
        context = torch.randn(B, F, generator=g, dtype=dtype)
    safety = torch.rand(B, K, generator=g, dtype=dtype)
    safety[::3] = (safety[::3] * 3).round() / 3  # ties in every third row
    s = Signals(
        teacher_logits=logits,
        labels=torch.randint(0, V, (B,), generator=g),
        task_ids=torch.randint(0, num_tasks, (B,), generator=g),
        context=context,
        safety=safety,
        student_logits=2.0 * torch.randn(B, V, generator=g, dtype=dtype),
    )
    return s, cases


def _resample(s: Signals, names: tuple[str, ...], operator: Any, seed: int) -> Signals:
    fresh, _ = sample_signals(operator, s.num_teachers(), s.batch_shape()[0], s.teacher_logits.shape[-1], seed,
                              s.teacher_logits.dtype)
    return s.replace(**{n: getattr(fresh, n) for n in names if getattr(s, n) is not None})


def _pw(cases: list[str], row: int, seed: int, **tensors: Tensor) -> dict[str, Any]:
    """A witness: seed, row, edge case and each tensor's ``row`` (rounded)."""
    return {"seed": seed, "row": row, "case": cases[row]} | {k: _round(v[row]) for k, v in tensors.items()}


def _witness(s: Signals, row: int, cases: list[str], seed: int, **extra: Tensor) -> dict[str, Any]:
    """`_pw` of the signals' present fields, then ``extra``."""
    fields = {n: getattr(s, n) for n in ("teacher_logits", "labels", "task_ids", "context", "safety", "student_logits")
              if getattr(s, n) is not None}
    return _pw(cases, row, seed, **fields, **extra)


# ---------------------------------------------------------------------------------------------- operator checks
def _run(op: WeightOperator, s: Signals) -> Tensor:
    return op(s).to(torch.float64)


def _check_normalization(op, s, cases, seed, declared) -> AxiomResult:
    w = _run(op, s)
    err = torch.maximum((w.sum(-1) - 1).abs(), (-w).clamp_min(0).amax(-1))
    err = torch.where(torch.isfinite(w).all(-1), err, torch.full_like(err, math.inf))
    row = int(err.argmax())
    worst = float(err[row])
    return AxiomResult("normalization", "W1", worst <= 1e-9, "normalization" in declared,
                       {"max_error": worst}, _witness(s, row, cases, seed, weights=w), seed,
                       "" if worst <= 1e-9 else "weights leave the simplex")


def _ratio(w: Tensor) -> Tensor:
    """``max_k w_k / min_k w_k`` per row."""
    return w.amax(-1) / w.amin(-1)


def _check_bounds(op, s, cases, seed, declared, d) -> AxiomResult:
    w = _run(op, s)
    w_min, w_max = float(w.min()), float(w.max())
    ratio = float(_ratio(w).max()) if w_min > 0 else math.inf
    measured = {"w_min": w_min, "w_max": w_max, "max_ratio": ratio}
    ok = w_min > 0 and w_max < 1 or w.shape[-1] == 1
    msg = []
    if d.w_min is not None:
        measured["declared_w_min"] = d.w_min
        if w_min < d.w_min - 1e-9:
            ok, msg = False, msg + [f"min weight {w_min:.4g} < declared w_min {d.w_min:.4g}"]
    if d.w_max is not None:
        measured["declared_w_max"] = d.w_max
        if w_max > d.w_max + 1e-9:
            ok, msg = False, msg + [f"max weight {w_max:.4g} > declared w_max {d.w_max:.4g}"]
    if d.ratio_bound is not None:
        measured["declared_ratio"] = d.ratio_bound
    row = int(w.amin(-1).argmin()) if not msg or "min" in msg[0] else int(w.amax(-1).argmax())
    return AxiomResult("bounded_influence", "W2", ok, "bounded_influence" in declared, measured,
                       _witness(s, row, cases, seed, weights=w), seed, "; ".join(msg))


def _perturbed(s: Signals, fields: tuple[str, ...], deltas: dict[str, Tensor]) -> Signals:
    return s.replace(**{f: getattr(s, f) + deltas[f] for f in fields})


def _linf(deltas: dict[str, Tensor]) -> Tensor:
    return torch.stack([d.abs().flatten(1).amax(1) for d in deltas.values()]).amax(0)


def _lipschitz_search(f: Callable[[Signals], Tensor], s: Signals, fields: tuple[str, ...], radius: float,
                      g: torch.Generator, steps: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row ``max ‖f(s+δ) − f(s)‖₁ / ‖δ‖_∞`` over ``‖δ‖_∞ ≤ radius``: random signs, then sign-gradient ascent
    (when ``f`` is differentiable) or sign-flip hill climbing."""
    base = f(s).detach()
    deltas = {n: radius * torch.sign(torch.rand(getattr(s, n).shape, generator=g, dtype=getattr(s, n).dtype) - 0.5)
              for n in fields}

    def value(ds: dict[str, Tensor]) -> Tensor:
        out = f(_perturbed(s, fields, ds))
        return (out - base).abs().sum(-1) / _linf(ds).clamp_min(1e-300)

    with torch.no_grad():
        best = value(deltas)
    for _ in range(steps):
        ds = {n: d.clone().requires_grad_(True) for n, d in deltas.items()}
        val = value(ds)
        if val.requires_grad:
            grads = torch.autograd.grad(val.sum(), list(ds.values()), allow_unused=True)
            cand = {n: (d.detach() + radius * 0.5 * torch.sign(gr if gr is not None else torch.zeros_like(d)))
                    .clamp(-radius, radius) for (n, d), gr in zip(ds.items(), grads)}
        else:
            cand = {}
            for n, d in deltas.items():
                flip = torch.rand(d.shape, generator=g, dtype=d.dtype) < 0.2
                cand[n] = torch.where(flip, -d, d)
        with torch.no_grad():
            v = value(cand)
        better = v > best
        shape = lambda t: better.reshape(-1, *([1] * (t.dim() - 1)))  # noqa: E731
        deltas = {n: torch.where(shape(d), cand[n], d) for n, d in deltas.items()}
        best = torch.maximum(best, v)
    return best, deltas


def _lipschitz_and_jump(f: Callable[[Signals], Tensor], s: Signals, fields: tuple[str, ...], g: torch.Generator,
                        steps: int) -> tuple[Tensor, Tensor]:
    """Per-row Lipschitz estimate (max of `_lipschitz_search` at radii 1e-1 and 1e-3) and ``max ‖Δf‖₁`` at radius
    ``_JUMP_RADIUS`` (a jump there is a discontinuity)."""
    est = torch.stack([_lipschitz_search(f, s, fields, radius, g, steps)[0] for radius in (1e-1, 1e-3)]).amax(0)
    jump, _ = _lipschitz_search(f, s, fields, _JUMP_RADIUS, g, max(steps // 2, 1))
    return est, jump * _JUMP_RADIUS


def _check_continuity(op, s, cases, seed, declared, d, steps: int) -> AxiomResult:
    fields = tuple(f for f in d.lipschitz_wrt if getattr(s, f) is not None)
    if not fields:
        return AxiomResult("continuity", "W3", True, "continuity" in declared, {"lipschitz_estimate": 0.0},
                           None, seed, "no continuous inputs: weights are piecewise constant in discrete keys only")
    g = torch.Generator().manual_seed(seed)
    est, jump_l1 = _lipschitz_and_jump(lambda x: _run(op, x), s, fields, g, steps)
    row = int(est.argmax())
    L_hat, max_jump = float(est.max()), float(jump_l1.max())
    measured = {"lipschitz_estimate": L_hat, "max_jump_at_1e-7": max_jump}
    ok = max_jump <= _JUMP_TOL
    msg = "" if ok else f"discontinuity: ‖Δw‖₁ = {max_jump:.3g} for ‖Δs‖∞ ≤ {_JUMP_RADIUS:g}"
    if not ok:
        row = int(jump_l1.argmax())
    if d.lipschitz is not None:
        measured["declared_lipschitz"] = d.lipschitz
        if L_hat > d.lipschitz * (1 + 1e-6) + 1e-9:
            ok = False
            msg = (msg + "; " if msg else "") + f"Lipschitz estimate {L_hat:.4g} exceeds declared {d.lipschitz:.4g}"
    msg = msg or f"w.r.t. {', '.join(fields)} ({d.lipschitz_norm})"
    return AxiomResult("continuity", "W3", ok, "continuity" in declared, measured,
                       _witness(s, row, cases, seed), seed, msg)


def _check_safety(op, s, cases, seed, declared) -> list[AxiomResult]:
    g = torch.Generator().manual_seed(seed)
    K = s.num_teachers()
    w = _run(op, s)
    sigma = s.safety
    # (a) own score: raising σ_i never lowers w_i
    worst_a, row_a = math.inf, 0
    for i in range(K):
        bump = torch.rand(sigma.shape[0], generator=g, dtype=sigma.dtype) * 0.6
        up = sigma.clone()
        up[:, i] += bump
        dw = _run(op, s.replace(safety=up))[:, i] - w[:, i]
        if float(dw.min()) < worst_a:
            worst_a, row_a = float(dw.min()), int(dw.argmin())
    a = AxiomResult("safety_own_score", "W4a", worst_a >= -1e-9, "safety_own_score" in declared,
                    {"min_delta_own_weight": worst_a}, _witness(s, row_a, cases, seed, weights=w), seed,
                    "" if worst_a >= -1e-9 else "raising a teacher's safety lowered its weight")
    # (b) comonotone ceteris paribus: teachers i, j with identical signals, σ_i > σ_j ⇒ w_i ≥ w_j
    worst_b, wit_b = math.inf, None
    for i, j in itertools.permutations(range(K), 2):
        z = s.teacher_logits.clone()
        z[:, i] = z[:, j]
        sig = sigma.clone()
        sig[:, i] = sig[:, j] + 0.05 + torch.rand(sig.shape[0], generator=g, dtype=sig.dtype)
        s2 = s.replace(teacher_logits=z, safety=sig)
        w2 = _run(op, s2)
        gap = w2[:, i] - w2[:, j]
        if float(gap.min()) < worst_b:
            worst_b = float(gap.min())
            wit_b = _witness(s2, int(gap.argmin()), cases, seed, weights=w2) | {"safer": i, "less_safe": j}
    b = AxiomResult("safety_comonotone", "W4b", worst_b >= -1e-9, "safety_comonotone" in declared,
                    {"min_gap_safer_minus_less_safe": worst_b}, wit_b, seed,
                    "" if worst_b >= -1e-9 else "the safer of two otherwise identical teachers got less weight")
    # (c) ordinal: W(s, φ∘σ) = W(s, σ) for strictly increasing φ
    maps = {"affine": lambda x: 3.0 * x - 1.0, "cubic": lambda x: x ** 3 + 0.1 * x, "exp": torch.exp,
            "logistic": lambda x: torch.sigmoid(5.0 * (x - 0.5))}
    worst_c, row_c, which = 0.0, 0, "affine"
    for name, phi in maps.items():
        dw = (_run(op, s.replace(safety=phi(sigma))) - w).abs().sum(-1)
        if float(dw.max()) > worst_c:
            worst_c, row_c, which = float(dw.max()), int(dw.argmax()), name
    c = AxiomResult("safety_ordinal", "W4c", worst_c <= 1e-9, "safety_ordinal" in declared,
                    {"max_l1_change": worst_c}, _witness(s, row_c, cases, seed, weights=w) | {"phi": which}, seed,
                    "" if worst_c <= 1e-9 else f"weights changed under the monotone re-scaling {which}")
    return [a, b, c]


def _check_permutation(op, s, cases, seed, declared) -> AxiomResult:
    g = torch.Generator().manual_seed(seed)
    K = s.num_teachers()
    w = _run(op, s)
    worst, row, perm_w = 0.0, 0, None
    for _ in range(3):
        perm = torch.randperm(K, generator=g)
        err = (_run(op, s.permute_teachers(perm)) - w[:, perm]).abs().amax(-1)
        if float(err.max()) >= worst:
            worst, row, perm_w = float(err.max()), int(err.argmax()), perm.tolist()
    ok = worst <= 1e-6
    return AxiomResult("permutation_equivariance", "W5", ok, "permutation_equivariance" in declared,
                       {"max_error": worst}, _witness(s, row, cases, seed, weights=w) | {"perm": perm_w}, seed,
                       "" if ok else "relabelling teachers does not relabel the weights")


def _check_separation(op, s, cases, seed, declared) -> AxiomResult:
    others = tuple(f for scale, names in SCALE_FIELDS.items() if scale != op.scale for f in names)
    w = _run(op, s)
    s2 = _resample(s, others, op, seed + 7919)
    err = (_run(op, s2) - w).abs().amax(-1)
    worst, row = float(err.max()), int(err.argmax())
    return AxiomResult("scale_separation", "W6", worst <= 1e-12, "scale_separation" in declared,
                       {"max_change": worst}, _witness(s, row, cases, seed, weights=w), seed,
                       f"perturbed signals of other scales: {', '.join(others)}"
                       if worst <= 1e-12 else f"{op.scale}-scale weights change with {', '.join(others)}")


def _check_composition(op, s, cases, seed) -> AxiomResult:
    g = torch.Generator().manual_seed(seed)
    w1 = _run(op, s)
    B, K = w1.shape
    w2 = torch.softmax(2.0 * torch.randn(B, K, generator=g, dtype=w1.dtype), -1)
    w3 = torch.softmax(0.5 * torch.randn(B, K, generator=g, dtype=w1.dtype), -1)
    c = compose(token=w1, task=w2, context=w3).weights
    # neutral uniform factor and order independence
    neutral = float((compose(token=w1, task=torch.full_like(w1, 1.0 / K)).weights - w1).abs().max())
    order = float((compose(token=w2, task=w1).weights - compose(token=w1, task=w2).weights).abs().max())
    # ratio bounds multiply (rows with strictly positive factors)
    pos = (w1.amin(-1) > 0)
    excess = (_ratio(c) / (_ratio(w1) * _ratio(w2) * _ratio(w3)))[pos]
    ratio_excess = float(excess.max()) if excess.numel() else 0.0
    # ‖Δw‖₁ ≤ 2 tanh(η/2): random and adversarial (±η on the worst subset) log-factor perturbations
    etas = torch.tensor([0.05, 0.2, 0.1], dtype=w1.dtype)
    eta = float(etas.sum())
    bound = 2.0 * math.tanh(eta / 2.0)
    factors = [w1, w2, w3]
    logs = [torch.log(f) + etas[i] * (2 * torch.rand(B, K, generator=g, dtype=w1.dtype) - 1)
            for i, f in enumerate(factors)]
    c_rand = torch.softmax(sum(logs), -1)
    rand_l1 = (c_rand - c).abs().sum(-1)
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)), dtype=w1.dtype)  # [2^K, K]
    adv = c.unsqueeze(1) * torch.exp(eta * (2 * masks - 1)).unsqueeze(0)
    adv = adv / adv.sum(-1, keepdim=True)
    adv_l1 = (adv - c.unsqueeze(1)).abs().sum(-1).amax(-1)
    worst_l1 = torch.maximum(rand_l1, adv_l1)
    tight = float(worst_l1.max()) / bound
    ok = neutral <= 1e-12 and order <= 1e-12 and ratio_excess <= 1 + 1e-9 and tight <= 1 + 1e-9
    row = int(worst_l1.argmax())
    return AxiomResult("composition_closure", "C1", ok, True,
                       {"neutral_error": neutral, "order_error": order, "ratio_product_excess": ratio_excess,
                        "tanh_bound": bound, "tanh_tightness": tight},
                       _witness(s, row, cases, seed, weights=w1), seed,
                       f"eta = {eta:g} (sum of per-scale log perturbations)")


def check_axioms(operator: WeightOperator, num_teachers: int | None = None, batch: int = 56, vocab: int = 8,
                 seed: int = 0, steps: int = 8, dtype: torch.dtype = torch.float64) -> AxiomReport:
    """Check a `WeightOperator` against W1–W6 and composition closure; see the module docstring."""
    if not isinstance(operator, WeightOperator):
        raise TypeError(f"check_axioms needs a WeightOperator, got {type(operator).__name__}")
    if num_teachers is not None and num_teachers < 1:
        raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
    K = num_teachers or operator.num_teachers or 4
    d = operator.declared(K)
    declared = d.claims
    s, cases = sample_signals(operator, K, batch, vocab, seed, dtype)
    logger.info("check_axioms(%s): K=%d, %d samples, seed=%d", type(operator).__name__, K, batch, seed)
    with torch.no_grad():
        results = [_check_normalization(operator, s, cases, seed, declared),
                   _check_bounds(operator, s, cases, seed + 1, declared, d)]
    results.append(_check_continuity(operator, s, cases, seed + 2, declared, d, steps))
    with torch.no_grad():
        results += _check_safety(operator, s, cases, seed + 3, declared)
        results.append(_check_permutation(operator, s, cases, seed + 4, declared))
        results.append(_check_separation(operator, s, cases, seed + 5, declared))
        results.append(_check_composition(operator, s, cases, seed + 6))
    return AxiomReport(type(operator).__name__, "operator", results, seed)


# ---------------------------------------------------------------------------------------------- pool checks
_DEFAULT_POOL_CLAIMS = frozenset({"simplex_output", "idempotence", "positivity_all", "continuity"})


def _pool_inputs(K: int, V: int, B: int, seed: int,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, list[str], torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    logits, cases = _teacher_logits(B, K, V, g, dtype)
    w = torch.softmax(2.0 * torch.randn(B, K, generator=g, dtype=dtype), -1)
    w[1::5] = torch.full((K,), 1.0 / K, dtype=dtype)
    return torch.log_softmax(logits, -1), w, cases, g


def check_pool(pool: Callable[[Tensor, Tensor], Tensor], num_teachers: int = 4, batch: int = 56, vocab: int = 8,
               seed: int = 0, steps: int = 8, dtype: torch.dtype = torch.float64) -> AxiomReport:
    """Check an aggregation operator ``pool(teacher_logp [..., K, V], weights [..., K]) -> logp [..., V]``
    against A1–A5 (the companion paper's aggregation axioms); ``pool.claims`` (if present) lists what it declares."""
    claims = frozenset(getattr(pool, "claims", _DEFAULT_POOL_CLAIMS))
    unknown = claims - set(POOL_AXIOMS)
    if unknown:
        raise ValueError(f"pool claims unknown axioms {sorted(unknown)}; known: {POOL_AXIOMS}")
    K, V, B = num_teachers, vocab, batch
    lp, w, cases, g = _pool_inputs(K, V, B, seed, dtype)
    name = getattr(pool, "name", None) or getattr(pool, "__name__", type(pool).__name__)
    P = lp.exp()
    results: list[AxiomResult] = []

    def res(key: str, ok: bool, measured: dict, witness: dict | None, msg: str = "") -> None:
        axiom_id = _IDS["continuity_pool" if key == "continuity" else key]
        results.append(AxiomResult(key, axiom_id, bool(ok), key in claims, measured, witness, seed, msg))

    with torch.no_grad():
        q = pool(lp, w).to(dtype)
        err = (torch.logsumexp(q, -1)).abs()
        err = torch.where(torch.isnan(q).any(-1), torch.full_like(err, math.inf), err)
        row = int(err.argmax())
        res("simplex_output", float(err.max()) <= 1e-9, {"max_error": float(err.max())},
            _pw(cases, row, seed, q=q.exp(), w=w, teacher_logp=lp), "logsumexp_v log q = 0, no NaN")
        same = lp[:, :1].expand_as(lp)
        qi = pool(same, w).to(dtype).exp()
        e = (qi - same[:, 0].exp()).abs().sum(-1)
        row = int(e.argmax())
        res("idempotence", float(e.max()) <= 1e-9, {"max_l1_error": float(e.max())},
            _pw(cases, row, seed, q=qi, w=w, teacher_logp=same), "pool(p, …, p; w) = p")
        Q = q.exp()
        below = (P.amin(-2) - Q).clamp_min(0).amax(-1)
        above = (Q - P.amax(-2)).clamp_min(0).amax(-1)
        h = torch.maximum(below, above)
        row = int(h.argmax())
        res("hull_membership", float(h.max()) <= 1e-9, {"max_envelope_violation": float(h.max())},
            _pw(cases, row, seed, q=Q, w=w, teacher_logp=lp),
            "coordinatewise envelope min_k p_k ≤ q ≤ max_k p_k (necessary condition)")
        pos = torch.isneginf(q)  # log space: e^{-1000} is positive even where it underflows
        res("positivity_all", not bool(pos.any()), {"zero_entries": float(pos.sum())},
            _pw(cases, int(pos.any(-1).to(torch.int8).argmax()), seed, logq=q, w=w, teacher_logp=lp),
            "q(v) > 0 wherever every teacher has p_k(v) > 0")
        # positivity from any teacher: teacher 0 has a zero where the others do not
        lz = lp.clone()
        lz[:, 0, 0] = -math.inf
        lz = torch.log_softmax(lz, -1)
        qz = pool(lz, w).to(dtype)
        zero = torch.isneginf(qz[:, 0])
        res("positivity_any", not bool(zero.any()), {"zero_entries": float(zero.sum())},
            _pw(cases, int(zero.to(torch.int8).argmax()), seed, logq=qz, w=w, teacher_logp=lz),
            "q(v) > 0 whenever some teacher with w_k > 0 has p_k(v) > 0")

    # A3 continuity in (teacher logits, weight logits)
    def f(x: Signals) -> Tensor:
        return pool(torch.log_softmax(x.teacher_logits, -1), torch.softmax(x.context, -1)).to(dtype).exp()

    sig = Signals(teacher_logits=lp, context=torch.log(w))
    est_all, jump_l1 = _lipschitz_and_jump(f, sig, ("teacher_logits", "context"), g, steps)
    max_jump = float(jump_l1.max())
    res("continuity", max_jump <= _JUMP_TOL,
        {"lipschitz_estimate": float(est_all.max()), "max_jump_at_1e-7": max_jump},
        _pw(cases, int(est_all.argmax()), seed, w=w, teacher_logp=lp),
        "ℓ∞ of teacher logits and weight logits → ℓ1 of q")

    with torch.no_grad():
        # A4 weight monotonicity: w' = (1−ε)w + ε e_k moves q toward p_k
        worst_f, worst_r, wit_f, wit_r = -math.inf, -math.inf, None, None
        for k in range(K):
            ek = torch.zeros(K, dtype=dtype)
            ek[k] = 1.0
            pk = lp[:, k]
            for eps in (0.05, 0.3):
                q2 = pool(lp, (1 - eps) * w + eps * ek).to(dtype)
                fwd = kl_per_token(pk, q2) - kl_per_token(pk, q)
                rev = kl_per_token(q2, pk) - kl_per_token(q, pk)
                fwd = fwd - 1e-9 * (1 + kl_per_token(pk, q).abs())
                rev = rev - 1e-9 * (1 + kl_per_token(q, pk).abs())
                if float(fwd.max()) > worst_f:
                    worst_f = float(fwd.max())
                    wit_f = _pw(cases, int(fwd.argmax()), seed, w=w, teacher_logp=lp) | {"k": k, "eps": eps}
                if float(rev.max()) > worst_r:
                    worst_r = float(rev.max())
                    wit_r = _pw(cases, int(rev.argmax()), seed, w=w, teacher_logp=lp) | {"k": k, "eps": eps}
        res("weight_monotonicity_forward", worst_f <= 0, {"max_increase_kl_pk_q": max(worst_f, 0.0)}, wit_f,
            "KL(p_k‖q′) ≤ KL(p_k‖q) for w′ = (1−ε)w + εe_k")
        res("weight_monotonicity_reverse", worst_r <= 0, {"max_increase_kl_q_pk": max(worst_r, 0.0)}, wit_r,
            "KL(q′‖p_k) ≤ KL(q‖p_k) for w′ = (1−ε)w + εe_k")
        # A5 temperature coherence
        strong = 0.0
        for T in (0.5, 2.0, 5.0):
            a = pool(soften(lp, torch.full((K,), T, dtype=dtype)), w).to(dtype)
            b = torch.log_softmax(q / T, -1)
            strong = max(strong, float((a.exp() - b.exp()).abs().sum(-1).max()))
        res("temperature_coherence_strong", strong <= 1e-9, {"max_l1_commutation_error": strong}, None,
            "pool(F_T(p_1..p_K); w) = F_T(pool(p; w)) for T in {0.5, 2, 5}")
        ones = pool(soften(lp, torch.ones(K, dtype=dtype)), w).to(dtype)
        id_err = float((ones.exp() - Q).abs().sum(-1).max())
        hot = pool(soften(lp, torch.full((K,), 1e6, dtype=dtype)), w).to(dtype).exp()
        unif_err = float((hot - 1.0 / V).abs().sum(-1).max())
        t1 = pool(soften(lp, torch.full((K,), 2.0, dtype=dtype)), w).to(dtype).exp()
        t2 = pool(soften(lp, torch.full((K,), 2.0 + 1e-7, dtype=dtype)), w).to(dtype).exp()
        cont_T = float((t1 - t2).abs().sum(-1).max())
        weak_ok = id_err <= 1e-9 and unif_err <= 1e-3 and cont_T <= 1e-4
        res("temperature_coherence_weak", weak_ok,
            {"identity_error_T1": id_err, "uniform_error_T1e6": unif_err, "l1_change_dT_1e-7": cont_T}, None,
            "F_1 = id, all T_k → ∞ gives uniform, continuity in T")
    order = {n: i for i, n in enumerate(POOL_AXIOMS)}
    results.sort(key=lambda r: order[r.name])
    return AxiomReport(str(name), "pool", results, seed)


# ---------------------------------------------------------------------------------------------- entry points
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def load_object(spec: str, kwargs: Mapping[str, Any] | None = None) -> Any:
    """Import ``"package.module:attr.path"``; a class is instantiated with ``kwargs`` (none by default).

    A keyword value that is itself a ``"module:attr"`` string, or a mapping ``{"object": "module:attr", **kw}``, is
    loaded the same way first, e.g. ``load_object("safekd.weighting:SafetyPrior",
    {"base": {"object": "safekd.weighting:ConfidenceSoftmax", "beta": 4.0}, "gamma": 0.5})``.

    Raises:
        ValueError: the reference does not resolve, or ``kwargs`` are given for an object that is not a class.
        TypeError: the constructor rejects the arguments.
    """
    obj = import_reference(spec)
    resolved = {k: _load_value(v) for k, v in (kwargs or {}).items()}
    if isinstance(obj, type):
        return obj(**resolved)
    if resolved:
        raise ValueError(f"{spec} is not a class, so it takes no constructor arguments (got {sorted(resolved)})")
    return obj


def _load_value(value: Any) -> Any:
    if isinstance(value, str) and _REFERENCE.match(value):
        return load_object(value)
    if isinstance(value, Mapping) and "object" in value:
        return load_object(str(value["object"]), {k: v for k, v in value.items() if k != "object"})
    return value


def check(obj: Any, **kwargs: Any) -> AxiomReport:
    """`check_axioms` for a `WeightOperator`, `check_pool` for any other callable."""
    if isinstance(obj, WeightOperator):
        return check_axioms(obj, **kwargs)
    if callable(obj):
        return check_pool(obj, **kwargs)
    raise TypeError(f"expected a WeightOperator or a pool callable, got {type(obj).__name__}")
