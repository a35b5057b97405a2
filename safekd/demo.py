"""``safekd demo``: the main job on real data, end to end, in well under a minute on 2 CPU cores.

1. scikit-learn's bundled digits, split (fixed seed) into teacher / distill / held-out parts;
2. five real teachers trained on the spot — logistic regression, an MLP, a small CNN, k-NN — and a **biased**
   teacher that over-predicts the forbidden class 8;
3. a student MLP distilled with token(=sample)-level adaptive weights (confidence softmax with a safety prior), a
   cap on the biased teacher, an ``unsafe_mass`` constraint on the pooled target and a constraint on the student's
   false-positive rate for class 8 (predicting 8 when the label is not 8);
4. an unconstrained student (same weighting without the safety prior, same budget) for comparison;
5. the audit on held-out data, written as JSON / HTML / Markdown to ``./safekd-demo/``.

The job itself is the embedded spec ``safekd/data/digits_demo.yaml`` (``examples/digits_spec.yaml`` is a copy
that ``safekd train --spec`` runs).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from safekd.auditing.core import audit
from safekd.auditing.render import write_report
from safekd.auditing.report import AuditReport, ConstraintResult
from safekd.jobs import Job, load_job, prepare_data, run_training, train_student
from safekd.spec.document import Spec

__all__ = ["DemoConfig", "DemoResult", "demo_job", "run_demo", "FPR_CONSTRAINT"]

logger = logging.getLogger(__name__)

FPR_CONSTRAINT = "forbidden_fpr"


def demo_job() -> Job:
    """The embedded demo job (``safekd/data/digits_demo.yaml``)."""
    with resources.as_file(resources.files("safekd.data").joinpath("digits_demo.yaml")) as path:
        return load_job(path)


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of :func:`run_demo`; ``None`` keeps the embedded job's value."""

    out: Path = Path("safekd-demo")
    device: str = "cpu"
    seed: int | None = None
    epochs: int | None = None
    confidence: float | None = None
    progress: bool = False


@dataclass
class DemoResult:
    """The constrained student's audit, the unconstrained baseline's audit, where the report is, and timings."""

    report: AuditReport
    baseline: AuditReport
    paths: dict[str, Path]
    seconds: float

    def _fpr(self, r: AuditReport) -> ConstraintResult:
        return r.constraint(FPR_CONSTRAINT)

    def table(self) -> str:
        """The short table the CLI prints."""
        c = self._fpr(self.report)
        head = (f"{'student':<16} {'accuracy':>8}  {'FPR(8)':>7}  {f'{c.confidence:.0%} bound':>9}  "
                f"{f'FPR ≤ {c.threshold:g}':>10}")
        rows = [head, "-" * len(head)]
        for name, r in (("unconstrained", self.baseline), ("safekd", self.report)):
            f = self._fpr(r)
            rows.append(f"{name:<16} {r.metrics['accuracy']:>8.4f}  {f.estimate:>7.4f}  {f.bound:>9.4f}  "
                        f"{'PASS' if f.passed else 'FAIL':>10}")
        n_pass = sum(x.passed for x in self.report.constraints)
        rows += ["", f"safekd student: {n_pass}/{len(self.report.constraints)} constraints pass at "
                     f"{self.report.confidence:.0%} on {int(self.report.metrics['examples'])} held-out digits "
                     f"({'PASS' if self.report.passed else 'FAIL'})",
                 f"report: {self.paths['html']}  (also {self.paths['json'].name}, {self.paths['md'].name})",
                 f"time: {self.seconds:.1f} s"]
        return "\n".join(rows)


def _configured(cfg: DemoConfig) -> Job:
    job = demo_job()
    kw: dict[str, Any] = {"out": Path(cfg.out)}
    if cfg.seed is not None:
        kw["seed"] = cfg.seed
    if cfg.epochs is not None:
        if cfg.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
        kw["epochs"] = cfg.epochs
    if cfg.confidence is not None:
        kw["confidence"] = cfg.confidence
    return replace(job, **kw)


def run_demo(cfg: DemoConfig = DemoConfig()) -> DemoResult:
    """Run the demo (see the module docstring); writes ``report.{json,html,md}``, ``checkpoint.pt`` and
    ``steps.jsonl`` to ``cfg.out`` and returns the reports."""
    t0 = time.perf_counter()
    job = _configured(cfg)
    splits = prepare_data(job, cfg.device)
    logger.info("teachers trained and cached in %.1f s", time.perf_counter() - t0)

    base_job = job.without_constraints()
    base = train_student(base_job, splits[job.train_split], device=cfg.device, progress=cfg.progress,
                         desc="unconstrained")
    student_only = Spec(teachers=job.spec.teachers, constraints=job.spec.student_constraints, unsafe=job.spec.unsafe)
    baseline = audit(base.student, splits[job.audit_split], student_only, confidence=job.confidence, distiller=base,
                     seed=job.seed)
    write_report(baseline, Path(cfg.out) / "baseline")
    f = baseline.constraint(FPR_CONSTRAINT)
    metrics = {"baseline_accuracy": baseline.metrics["accuracy"], f"baseline_{FPR_CONSTRAINT}": f.estimate,
               f"baseline_{FPR_CONSTRAINT}_bound": f.bound}
    result = run_training(job, cfg.out, device=cfg.device, progress=cfg.progress, splits=splits, metrics=metrics)
    return DemoResult(report=result.report, baseline=baseline, paths=result.paths, seconds=time.perf_counter() - t0)
