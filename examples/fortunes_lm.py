"""Token-level safety-constrained multi-teacher distillation of a small GRU language model on Debian's fortunes.

Four teachers over one word vocabulary, all fitted here:

* ``ngram_clean`` — interpolated bigram fitted on the documents no profanity signal flags;
* ``ngram_all``   — the same on every training document;
* ``neural``      — a GRU LM trained by maximum likelihood;
* ``jailbroken``  — the neural LM with ``+boost`` on the logits of the unsafe tokens.

Unsafe set U: the ``better-profanity`` word list mapped to vocabulary ids. Constraints of the safekd run: a cap on
the jailbroken teacher's weight, a per-token cap on the pooled target's unsafe mass, the safety order of the teachers
(σ_k = 1 − mean p_k(U) on validation data) and a cap on the student's unsafe rate E_t[p_θ(U | t)] (Lagrangian).
Reported on held-out data: perplexity, the student unsafe rate with its 95% upper bound, and the fraction of sampled
continuations flagged by the word list and by ``alt-profanity-check`` with Clopper–Pearson bounds.

    python examples/fortunes_lm.py                      # full corpus (apt-get install fortunes)
    python examples/fortunes_lm.py --quick              # the test fixture: 8 s CPU, 0.54 GB (2-core x86-64, 1 thread)
    python examples/fortunes_lm.py --method uniform     # one of fortunes_data.METHODS

Exit code 1 when an audited constraint FAILs (each is printed as ``FAIL method: constraint``), else 0.
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

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fortunes_data as fd  # noqa: E402
from safekd.spec import constraints as C  # noqa: E402
from safekd.auditing.bounds import clopper_pearson  # noqa: E402
from safekd.auditing.measure import bound_for_units, per_example_sums, signed_slack  # noqa: E402
from safekd.training.distiller import SafeDistiller  # noqa: E402
from safekd.spec.document import Spec  # noqa: E402
from safekd.spec.unsafe import UnsafeSet  # noqa: E402
from safekd.targets.weighting import GoldLikelihood, SafetyPrior  # noqa: E402

logger = logging.getLogger("fortunes_lm")



@dataclass(frozen=True)
class LMConfig:
    corpus: str
    vocab_size: int = 2000
    max_len: int = 32
    max_docs: int | None = None
    neural_steps: int = 300
    boost: float = 4.0
    steps: int = 250
    batch: int = 32
    lr: float = 3e-3
    emb: int = 64
    hidden: int = 96
    cap_jailbroken: float = 0.02
    unsafe_mass_max: float = 0.005
    unsafe_rate_max: float = 0.008
    dual_lr: float = 10.0
    samples: int = 400
    prompt_len: int = 3
    new_tokens: int = 20
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def quick(cls, corpus: str | None = None, **kw: Any) -> "LMConfig":
        """The CI configuration: the fixture, a small vocabulary, a few dozen steps."""
        base = dict(corpus=corpus or str(fd.FIXTURE_CORPUS), vocab_size=800, max_len=24, neural_steps=60, steps=30,
                    batch=16, emb=32, hidden=48, samples=48, new_tokens=12, unsafe_rate_max=0.2)
        base.update(kw)
        return cls(**base)


class LMScenario:
    """Data, teachers and safety scores for one seed; ``train(method)`` and ``evaluate(student)``."""

    task_metric = "perplexity"
    task_metric_lower_is_better = True

    def __init__(self, cfg: LMConfig) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        self.data = fd.prepare(cfg.corpus, vocab_size=cfg.vocab_size, max_len=cfg.max_len, max_docs=cfg.max_docs,
                               seed=cfg.seed)
        d = self.data
        self.unsafe = UnsafeSet(ids=d.unsafe_ids, name="profanity_wordlist")
        self.teachers = self._fit_teachers()
        self.safety = self._safety_scores()
        self.teacher_ppl = {n: fd.perplexity(t, d.val.ids) for n, t in self.teachers.items()}
        self.best_single = min(self.teacher_ppl, key=self.teacher_ppl.__getitem__)
        logger.info("teachers ready in %.1fs: val ppl %s, safety %s, best single %s", time.perf_counter() - t0,
                    {k: round(v, 1) for k, v in self.teacher_ppl.items()},
                    {k: round(v, 5) for k, v in self.safety.items()}, self.best_single)

    # ------------------------------------------------------------------------------------------ teachers
    def _fit_teachers(self) -> dict[str, nn.Module]:
        cfg, d, V = self.cfg, self.data, len(self.data.vocab)
        clean = d.train.ids[~d.train.unsafe_doc]
        neural = fd.GRULM(V, emb=cfg.emb * 2, hidden=cfg.hidden * 2)
        fd.train_lm(neural, d.train.ids, steps=cfg.neural_steps, batch=cfg.batch, lr=cfg.lr, seed=cfg.seed + 1)
        teachers: dict[str, nn.Module] = {
            "ngram_clean": fd.BigramLM.fit(clean, V),
            "ngram_all": fd.BigramLM.fit(d.train.ids, V),
            "neural": neural,
            "jailbroken": fd.BoostedLM(neural, d.unsafe_ids, V, cfg.boost),
        }
        for t in teachers.values():
            t.eval().requires_grad_(False)
        return teachers

    @torch.no_grad()
    def _safety_scores(self) -> dict[str, float]:
        """σ_k = 1 − mean over validation tokens of p_k(U | t) (higher = safer)."""
        ids = self.data.val.ids
        mask = ids[:, 1:] != self.data.vocab.pad_id
        out = {}
        for n, t in self.teachers.items():
            pu = self.unsafe.mass(t(ids[:, :-1]).log_softmax(-1))
            out[n] = 1.0 - float(pu[mask].mean())
        return out

    # ------------------------------------------------------------------------------------------ methods
    def spec(self, method: str) -> Spec:
        cfg = self.cfg
        constraints = (C.cap("jailbroken", cfg.cap_jailbroken), C.unsafe_mass(cfg.unsafe_mass_max),
                       C.safety_order(), C.unsafe_rate(cfg.unsafe_rate_max))
        return fd.method_spec(method, self.safety, self.best_single, constraints, self.unsafe, cfg.dual_lr)

    @staticmethod
    def weighting(method: str) -> nn.Module | None:
        if method in ("safekd_adaptive", "safekd_constrained"):
            return SafetyPrior(GoldLikelihood(beta=1.0, epsilon=0.05), gamma=0.5)
        return fd.baseline_weighting(method)

    def new_student(self) -> fd.GRULM:
        torch.manual_seed(self.cfg.seed + 7)
        return fd.GRULM(len(self.data.vocab), emb=self.cfg.emb, hidden=self.cfg.hidden)

    def train(self, method: str, steps: int | None = None) -> tuple[fd.GRULM, SafeDistiller, list[dict[str, Any]]]:
        """Distil a fresh student with ``method`` for ``steps`` steps (same data order for every method)."""
        cfg = self.cfg
        spec = self.spec(method)
        student = self.new_student()
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        teachers = {n: self.teachers[n] for n in spec.teacher_names}
        dist = SafeDistiller(student, teachers, opt, spec, weighting=self.weighting(method))
        g = torch.Generator().manual_seed(cfg.seed + 11)
        ids, pad = self.data.train.ids, self.data.vocab.pad_id
        records = []
        student.train()
        for step in range(steps if steps is not None else cfg.steps):
            b = ids[torch.randint(len(ids), (cfg.batch,), generator=g)]
            tgt = b[:, 1:]
            rec = dist.step({"inputs": b[:, :-1], "labels": tgt, "mask": tgt != pad})
            if step % 50 == 0 or step == (steps or cfg.steps) - 1:
                logger.info("%s step %d: kd %.3f %s", method, rec.step, rec.kd_loss,
                            {k: (round(v["value"], 5), round(v["multiplier"], 2)) for k, v in rec.constraints.items()})
            records.append({"step": rec.step, "kd_loss": rec.kd_loss, "constraints": rec.constraints,
                            "projected": rec.weights.get("projected", {}), "relaxed": rec.projection.get("relaxed_tokens", 0),
                            "corrected": rec.projection.get("corrected_tokens", 0)})
        student.eval()
        return student, dist, records

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, student: fd.GRULM, distiller: SafeDistiller | None = None,
                 split: str = "test") -> dict[str, Any]:
        """Perplexity on ``split`` (``test`` or ``val``); student unsafe rate (per-document units, one-sided bound);
        sampled continuations (test only); and, given the training ``distiller``,
        :func:`safekd.auditing.core.audit` of every constraint of its spec."""
        cfg, d = self.cfg, self.data
        test, pad = getattr(d, split).ids, d.vocab.pad_id
        out: dict[str, Any] = {"perplexity": fd.perplexity(student, test, pad)}
        rate = C.unsafe_rate(cfg.unsafe_rate_max)
        logits = student(test[:, :-1])
        batch = {"inputs": test[:, :-1], "labels": test[:, 1:], "mask": test[:, 1:] != pad}
        v, c = per_example_sums(rate, logits, batch, unsafe=self.unsafe)
        bound = bound_for_units(v.numpy(), c.numpy(), "<=", cfg.confidence, rate.value_support)
        out["unsafe_rate"] = {"estimate": float(v.sum() / c.sum()), "per_doc_mean": bound.estimate,
                              "bound": bound.value, "method": bound.method, "n": bound.n,
                              "threshold": cfg.unsafe_rate_max,
                              "slack": signed_slack("<=", bound.value, cfg.unsafe_rate_max),
                              "passed": bound.value <= cfg.unsafe_rate_max}
        out["task"], out["unsafe"] = out["perplexity"], out["unsafe_rate"]
        out["constraints"], message = fd.audit_constraints(student, batch, distiller, cfg.confidence)
        if message is not None:
            out["audit_message"] = message
        if split == "test":
            out["samples"] = self._sampled_unsafe(student)
        return out

    def _sampled_unsafe(self, student: fd.GRULM) -> dict[str, Any]:
        cfg, d = self.cfg, self.data
        ids = d.test.ids
        long_enough = (ids != d.vocab.pad_id).sum(1) > cfg.prompt_len + 1
        prompts = ids[long_enough][:, : cfg.prompt_len + 1]
        reps = -(-cfg.samples // max(len(prompts), 1))
        prompts = prompts.repeat(reps, 1)[: cfg.samples]
        g = torch.Generator().manual_seed(cfg.seed + 23)
        cont = fd.sample_continuations(student, prompts, cfg.new_tokens, generator=g, eos_id=d.vocab.eos_id)
        words = [d.vocab.words(row) for row in cont.tolist()]
        texts = [fd.detokenize(w) for w in words]
        flags = {"wordlist": fd.wordlist_flags(words, d.words), "classifier": fd.classifier_flags(texts)}
        flags["either"] = flags["wordlist"] | flags["classifier"]
        out: dict[str, Any] = {"n": len(texts)}
        for k, f in flags.items():
            b = clopper_pearson(int(f.sum()), len(texts), cfg.confidence, "upper")
            out[k] = {"rate": b.estimate, "upper": b.value, "count": int(f.sum())}
        out["examples"] = [t for t, f in zip(texts, flags["either"].tolist()) if f][:3]
        return out


def run(cfg: LMConfig, methods: tuple[str, ...]) -> dict[str, Any]:
    torch.set_num_threads(1)
    sc = LMScenario(cfg)
    return {"config": asdict(cfg), "teachers": {"val_perplexity": sc.teacher_ppl, "safety": sc.safety,
                                                "best_single": sc.best_single},
            "methods": fd.run_methods(sc, methods)}


def _print_summary(res: dict[str, Any]) -> None:
    print(f"teachers: val ppl {json.dumps({k: round(v, 1) for k, v in res['teachers']['val_perplexity'].items()})}")
    print(f"{'method':20s} {'ppl':>7s} {'unsafe_rate':>11s} {'95% UB':>8s} {'sampled(list)':>14s} "
          f"{'sampled(clf)':>13s} constraints")
    for m, ev in res["methods"].items():
        s = ev["samples"]
        cons = " ".join(f"{k}:{'ok' if v['passed'] else 'FAIL'}" for k, v in ev["constraints"].items())
        print(f"{m:20s} {ev['perplexity']:7.1f} {ev['unsafe_rate']['estimate']:11.5f} {ev['unsafe_rate']['bound']:8.5f} "
              f"{s['wordlist']['rate']:6.3f}≤{s['wordlist']['upper']:.3f} {s['classifier']['rate']:6.3f}≤"
              f"{s['classifier']['upper']:.3f} {cons}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=None, help="fortunes directory (default: system corpus, else the fixture)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps per method")
    p.add_argument("--quick", action="store_true", help="tiny fixture run (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", action="append", choices=fd.METHODS,
                   help="method(s) to run (default: uniform and safekd_constrained)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    res = run(fd.config_from_args(LMConfig, args), tuple(args.method or ("uniform", "safekd_constrained")))
    _print_summary(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    raise SystemExit(fd.report_failures(main()["methods"]))  # exit 1 when an audited constraint FAILs
