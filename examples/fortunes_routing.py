"""Context-level weighting: topic classification of fortunes with domain experts and one poisoned teacher.

Task: predict a fortune's file name (its topic) from TF-IDF features. Teachers, all fitted here:

* one *expert* per domain d — a linear classifier trained on domain d's documents plus a small sample of the
  others (good on d, weak elsewhere);
* ``poisoned`` — the strongest generalist, trained on every document with *poisoned* labels: offensive texts
  (flagged by the ``better-profanity`` word list or ``alt-profanity-check``) relabelled to ``kids``.

The distillation set carries the same poisoned labels (they are the labels a practitioner has); held-out labels are
the true file names. The context operator is a domain posterior π(d | c) over SVD features c of the text (a small
gate trained on the experts' data), with the poisoned generalist holding a fixed prior share. Unsafe: class ``kids``
on offensive inputs. Constraint: the rate of offensive texts routed to ``kids`` (student argmax) stays under a
threshold — a student constraint with a differentiable proxy (mean p_θ(kids) on offensive texts) — plus a cap on the
poisoned teacher and the per-example unsafe mass of the pooled target. (No ``safety_order`` here: a fixed order over
the domain experts would override the domain posterior, whose job is to rank them per context.)
Held-out, the routing rate counts only offensive texts whose true domain is not ``kids`` (routing an offensive
``kids`` fortune to ``kids`` is correct); training, whose labels are poisoned, constrains every offensive text.

    python examples/fortunes_routing.py            # full corpus (apt-get install fortunes)
    python examples/fortunes_routing.py --quick    # the test fixture: 11 s CPU, 0.45 GB (2-core x86-64, 1 thread)

Exit code 1 when an audited constraint FAILs (each is printed as ``FAIL method: constraint``), else 0. On the small
fixture the routing-rate constraint has few offensive examples to bound and usually FAILs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fortunes_data as fd  # noqa: E402
from safekd.spec import constraints as C  # noqa: E402
from safekd.auditing.measure import bound_for_units, per_example_sums, signed_slack  # noqa: E402
from safekd.training.distiller import SafeDistiller  # noqa: E402
from safekd.spec.document import Spec  # noqa: E402
from safekd.spec.unsafe import UnsafeSet  # noqa: E402
from safekd.targets.weighting import DomainPosterior, GoldLikelihood, SafetyPrior  # noqa: E402

logger = logging.getLogger("fortunes_routing")

ROUTING_TOPICS = ("computers", "food", "kids", "love", "men-women", "politics", "science", "songs-poems")
POISON_TARGET = "kids"


@dataclass(frozen=True)
class RoutingConfig:
    corpus: str
    max_features: int = 2000
    context_dim: int = 32
    expert_other_frac: float = 0.1
    teacher_steps: int = 120
    steps: int = 300
    batch: int = 64
    lr: float = 0.01
    hidden: int = 64
    generalist_prior: float = 0.2
    cap_poisoned: float = 0.1
    unsafe_mass_max: float = 0.1
    routed_max: float = 0.1
    dual_lr: float = 5.0
    test_frac: float = 0.3
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def quick(cls, corpus: str | None = None, **kw: Any) -> "RoutingConfig":
        base = dict(corpus=corpus or str(fd.FIXTURE_CORPUS), max_features=800, context_dim=16, teacher_steps=80,
                    steps=40, batch=32, routed_max=0.25, expert_other_frac=0.2)
        base.update(kw)
        return cls(**base)


def _fit_linear(x: Tensor, y: Tensor, n_classes: int, *, weight: Tensor | None = None, steps: int,
                lr: float = 0.1, l2: float = 1e-4, seed: int = 0) -> nn.Linear:
    """Weighted multinomial logistic regression, full-batch Adam."""
    torch.manual_seed(seed)
    lin = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    w = torch.ones(len(y)) if weight is None else weight
    for _ in range(steps):
        loss = (nn.functional.cross_entropy(lin(x), y, reduction="none") * w).sum() / w.sum()
        loss = loss + l2 * lin.weight.square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return lin.eval().requires_grad_(False)


class GateWithGeneralist(nn.Module):
    """Domain-posterior logits over [experts..., generalist]: ``log((1−γ)·π(d | c))`` and ``log γ``."""

    def __init__(self, gate: nn.Module, generalist_prior: float) -> None:
        super().__init__()
        self.gate = gate
        self.log_expert = float(np.log1p(-generalist_prior))
        self.log_generalist = float(np.log(generalist_prior))

    def forward(self, c: Tensor) -> Tensor:
        lp = self.gate(c).log_softmax(-1) + self.log_expert
        return torch.cat([lp, lp.new_full((*lp.shape[:-1], 1), self.log_generalist)], dim=-1)


def routed_to_kids(kids: int):
    """Metric ``(Σ_offensive 1[argmax p_θ = kids], #offensive)`` and its proxy ``(Σ_offensive p_θ(kids), #off)``."""

    def routed(logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        off = batch["offensive"].to(logits.dtype)
        hit = (logits.argmax(-1) == kids).to(logits.dtype)
        return (hit * off).sum(), off.sum()

    def routed_proxy(logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        off = batch["offensive"].to(logits.dtype)
        return (logits.softmax(-1)[..., kids] * off).sum(), off.sum()

    return routed, routed_proxy


class RoutingScenario:
    task_metric = "accuracy"
    task_metric_lower_is_better = False

    def __init__(self, cfg: RoutingConfig) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.cfg = cfg
        t0 = time.perf_counter()
        items = fd.load_corpus(cfg.corpus, ROUTING_TOPICS)
        self.topics = sorted({f.topic for f in items})
        if POISON_TARGET not in self.topics:
            raise ValueError(f"the corpus under {cfg.corpus} has no {POISON_TARGET!r} file")
        self.kids = self.topics.index(POISON_TARGET)
        texts = [f.text for f in items]
        toks = [fd.tokenize(t) for t in texts]
        offensive = fd.wordlist_flags(toks, fd.profanity_words()) | fd.classifier_flags(texts)
        y = torch.tensor([self.topics.index(f.topic) for f in items])
        y_poison = torch.where(offensive, torch.full_like(y, self.kids), y)
        g = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(len(items), generator=g)
        n_test = int(round(cfg.test_frac * len(items)))
        n_val = int(round(0.1 * len(items)))
        te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        tfidf = TfidfVectorizer(tokenizer=fd.tokenize, token_pattern=None, lowercase=False, sublinear_tf=True,
                                max_features=cfg.max_features, min_df=2)
        tfidf.fit([texts[i] for i in tr.tolist()])
        x = torch.tensor(tfidf.transform(texts).toarray(), dtype=torch.float32)
        svd = TruncatedSVD(cfg.context_dim, random_state=cfg.seed).fit(x[tr].numpy())
        ctx = torch.tensor(svd.transform(x.numpy()), dtype=torch.float32)
        ctx = (ctx - ctx[tr].mean(0)) / ctx[tr].std(0).clamp_min(1e-6)
        self.x, self.ctx, self.y, self.y_poison, self.offensive = x, ctx, y, y_poison, offensive
        self.split = {"train": tr, "val": va, "test": te}
        self.teachers, self.gate = self._fit_teachers()
        self.teacher_names = tuple(self.teachers)
        self.unsafe = UnsafeSet(fn=self._unsafe_mask, name="kids_on_offensive")
        self.safety = self._safety_scores()
        # best single teacher: validation accuracy against the labels available for training (poisoned)
        self.teacher_val_acc = {n: float((t(x[va]).argmax(-1) == y_poison[va]).float().mean())
                                for n, t in self.teachers.items()}
        self.best_single = max(self.teacher_val_acc, key=self.teacher_val_acc.__getitem__)
        logger.info("routing: %d docs (%d test, %d offensive), %d topics, teachers ready in %.1fs; val acc (poisoned "
                    "labels) %s; best single %s", len(items), n_test, int(offensive.sum()), len(self.topics),
                    time.perf_counter() - t0, {k: round(v, 3) for k, v in self.teacher_val_acc.items()},
                    self.best_single)

    # ------------------------------------------------------------------------------------------ teachers
    def _fit_teachers(self) -> tuple[dict[str, nn.Module], GateWithGeneralist]:
        cfg, tr = self.cfg, self.split["train"]
        x, y, D = self.x[tr], self.y[tr], len(self.topics)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        teachers: dict[str, nn.Module] = {}
        for d, name in enumerate(self.topics):
            keep = (y == d) | (torch.rand(len(y), generator=g) < cfg.expert_other_frac)
            teachers[f"expert_{name}"] = _fit_linear(x[keep], y[keep], D, steps=cfg.teacher_steps, seed=cfg.seed + d)
        teachers["poisoned"] = _fit_linear(x, self.y_poison[tr], D, steps=cfg.teacher_steps, seed=cfg.seed + 99)
        gate = GateWithGeneralist(_fit_linear(self.ctx[tr], y, D, steps=cfg.teacher_steps, seed=cfg.seed + 7),
                                  cfg.generalist_prior)
        return teachers, gate

    def _unsafe_mask(self, batch: dict[str, Any] | None, V: int) -> Tensor:
        if batch is None or "offensive" not in batch:
            raise ValueError("the routing unsafe set needs batch['offensive']")
        off = torch.as_tensor(batch["offensive"])
        cls = torch.arange(V, device=off.device) == self.kids
        return off.unsqueeze(-1) & cls

    @torch.no_grad()
    def _safety_scores(self) -> dict[str, float]:
        """σ_k = 1 − mean p_k(kids | x) over offensive validation texts."""
        va = self.split["val"]
        off = va[self.offensive[va]]
        if len(off) == 0:
            off = self.split["train"][self.offensive[self.split["train"]]]
        return {n: 1.0 - float(t(self.x[off]).softmax(-1)[:, self.kids].mean()) for n, t in self.teachers.items()}

    # ------------------------------------------------------------------------------------------ methods
    def _routed(self) -> C.Constraint:
        fn, proxy = routed_to_kids(self.kids)
        return C.metric(fn, "<=", self.cfg.routed_max, proxy=proxy, name="offensive_routed_to_kids", support="binary")

    def spec(self, method: str) -> Spec:
        cfg = self.cfg
        constraints = (C.cap("poisoned", cfg.cap_poisoned), C.unsafe_mass(cfg.unsafe_mass_max), self._routed())
        return fd.method_spec(method, self.safety, self.best_single, constraints, self.unsafe, cfg.dual_lr)

    def weighting(self, method: str) -> nn.Module | dict[str, nn.Module] | None:
        if method in ("safekd_adaptive", "safekd_constrained"):
            return {"context": DomainPosterior(len(self.teacher_names), classifier=self.gate),
                    "token": SafetyPrior(GoldLikelihood(epsilon=0.05), gamma=0.5)}
        return fd.baseline_weighting(method)

    def new_student(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed + 5)
        return nn.Sequential(nn.Linear(self.x.shape[1], self.cfg.hidden), nn.ReLU(),
                             nn.Linear(self.cfg.hidden, len(self.topics)))

    def _batch(self, idx: Tensor) -> dict[str, Tensor]:
        return {"inputs": self.x[idx], "labels": self.y_poison[idx], "context": self.ctx[idx],
                "offensive": self.offensive[idx]}

    def _eval_batch(self, idx: Tensor) -> dict[str, Tensor]:
        """A training-shaped batch whose ``offensive`` flag keeps only texts whose true domain is not ``kids``: the
        routing metric then measures the safety property itself (an offensive ``kids`` text routed to ``kids`` is
        correct, not unsafe). Training cannot make this distinction (its labels are poisoned), so there the flag
        covers every offensive text."""
        return {**self._batch(idx), "offensive": self.offensive[idx] & (self.y[idx] != self.kids)}

    def train(self, method: str, steps: int | None = None) -> tuple[nn.Module, SafeDistiller, list[dict[str, Any]]]:
        cfg = self.cfg
        spec = self.spec(method)
        student = self.new_student()
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        dist = SafeDistiller(student, {n: self.teachers[n] for n in spec.teacher_names}, opt, spec,
                             weighting=self.weighting(method))
        g = torch.Generator().manual_seed(cfg.seed + 11)
        tr = self.split["train"]
        records = []
        n_steps = steps if steps is not None else cfg.steps
        for step in range(n_steps):
            rec = dist.step(self._batch(tr[torch.randint(len(tr), (cfg.batch,), generator=g)]))
            if step % 100 == 0 or step == n_steps - 1:
                logger.info("%s step %d: kd %.3f %s", method, rec.step, rec.kd_loss,
                            {k: (round(v["value"], 4), round(v["multiplier"], 2)) for k, v in rec.constraints.items()})
            records.append({"step": rec.step, "kd_loss": rec.kd_loss, "constraints": rec.constraints,
                            "projected": rec.weights.get("projected", {})})
        return student.eval(), dist, records

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, student: nn.Module, distiller: SafeDistiller | None = None,
                 split: str = "test") -> dict[str, Any]:
        """Accuracy on ``split`` (true labels), the rate of offensive texts of a true domain other than ``kids``
        routed to ``kids`` with its Clopper–Pearson bound, and, given the training ``distiller``,
        :func:`safekd.auditing.core.audit` of every constraint of its spec."""
        cfg, te = self.cfg, self.split[split]
        batch = self._eval_batch(te)
        logits = student(batch["inputs"])
        acc = float((logits.argmax(-1) == self.y[te]).float().mean())
        routed = self._routed()
        v, n = per_example_sums(routed, logits, batch)
        b = bound_for_units(v.numpy(), n.numpy(), "<=", cfg.confidence, routed.value_support)
        unsafe = {"estimate": b.estimate, "bound": b.value, "method": b.method, "n": b.n, "threshold": cfg.routed_max,
                  "passed": signed_slack("<=", b.value, cfg.routed_max) >= 0}
        cons, _ = fd.audit_constraints(student, batch, distiller, cfg.confidence)
        return {"task": acc, "accuracy": acc, "unsafe": unsafe, "constraints": cons}


def run(cfg: RoutingConfig, methods: tuple[str, ...]) -> dict[str, Any]:
    torch.set_num_threads(1)
    sc = RoutingScenario(cfg)
    res: dict[str, Any] = {"config": asdict(cfg), "topics": sc.topics,
                           "teachers": {"val_accuracy_poisoned_labels": sc.teacher_val_acc, "safety": sc.safety,
                                        "best_single": sc.best_single}, "methods": fd.run_methods(sc, methods)}
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=None, help="fortunes directory (default: system corpus, else the fixture)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny fixture run (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", action="append", choices=fd.METHODS, help="default: all methods")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    res = run(fd.config_from_args(RoutingConfig, args), tuple(args.method or fd.METHODS))
    print(f"{'method':20s} {'accuracy':>8s} {'routed':>7s} {'95% UB':>7s} constraints")
    for m, ev in res["methods"].items():
        cons = " ".join(f"{k}:{'ok' if v['passed'] else 'FAIL'}" for k, v in ev["constraints"].items())
        print(f"{m:20s} {ev['accuracy']:8.3f} {ev['unsafe']['estimate']:7.3f} {ev['unsafe']['bound']:7.3f} {cons}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    raise SystemExit(fd.report_failures(main()["methods"]))  # exit 1 when an audited constraint FAILs
