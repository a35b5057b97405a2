"""The `safekd demo` job written out step by step (same data, teachers, spec and audit as the demo).

    python examples/digits_safety.py [--out digits-safety]

1. digits → teacher / distill / held-out splits;  2. five teachers, one biased toward the forbidden class 8;
3. the spec from examples/digits_spec.yaml;  4. an unconstrained and a safekd student, same budget;
5. the held-out audit of both, with one-sided 95% bounds.
"""
import argparse
from pathlib import Path

import torch

from safekd.auditing import audit, write_report
from safekd.data.digits import FORBIDDEN_CLASS, digits_splits, digits_student, teacher_logprobs, train_digits_teachers
from safekd.training.distiller import SafeDistiller
from safekd.jobs import build_weighting, load_job
from safekd.spec.document import Spec

SPEC = Path(__file__).with_name("digits_spec.yaml")


def distil(spec: Spec, weighting: dict, train: dict, epochs: int, seed: int) -> SafeDistiller:
    """Distil a fresh student from the cached teacher logits in ``train``."""
    torch.manual_seed(seed)
    student = digits_student(seed=seed)
    distiller = SafeDistiller(student, None, torch.optim.Adam(student.parameters(), lr=3e-3), spec,
                              weighting=build_weighting(weighting, len(spec.teachers)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(train["labels"]), generator=gen).split(64):
            distiller.step({k: v[idx] for k, v in train.items()})   # inputs, labels, teacher_logits
    student.eval()
    return distiller


def main(out: str = "digits-safety") -> None:
    torch.set_num_threads(1)
    job = load_job(SPEC)                        # the `job:` section + the constraint spec
    spec, seed = job.spec, job.seed

    # 1-2. data and teachers; teacher log-probabilities are computed once and cached in every split
    splits = digits_splits(seed=seed)
    teachers = train_digits_teachers(splits["teacher"], seed=seed)
    for part in splits.values():
        part["teacher_logits"] = teacher_logprobs(teachers, part["inputs"])
    held = splits["heldout"]
    pred = held["teacher_logits"].argmax(-1)                       # [N, K]
    wrong = (held["labels"] != FORBIDDEN_CLASS).unsqueeze(-1)
    print("teacher   accuracy  FPR(8)")
    for k, t in enumerate(teachers):
        acc = (pred[:, k] == held["labels"]).float().mean()
        fpr = ((pred[:, k] == FORBIDDEN_CLASS) & wrong[:, 0]).sum() / wrong.sum()
        print(f"{t.name:<9} {acc:8.4f}  {fpr:6.4f}")

    # 3-4. the unconstrained student (no constraints, no safety prior) and the safekd student
    base_job = job.without_constraints()
    base = distil(base_job.spec, dict(base_job.weighting), splits["distill"], job.epochs, seed)
    safe = distil(spec, dict(job.weighting), splits["distill"], job.epochs, seed)

    # 5. audits on held-out data; the baseline is audited on the student constraint only
    student_only = Spec(teachers=spec.teachers, constraints=spec.student_constraints, unsafe=spec.unsafe)
    base_report = audit(base.student, held, student_only, distiller=base, seed=seed)
    report = audit(safe.student, held, spec, distiller=safe, seed=seed,
                   metrics={"baseline_accuracy": base_report.metrics["accuracy"]})
    for name, r in (("unconstrained", base_report), ("safekd", report)):
        print(f"\n{name}: accuracy {r.metrics['accuracy']:.4f}; {r.message}")
        print(r.summary_table())
    print("\nreport:", write_report(report, out)["html"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits-safety", help="report directory")
    main(parser.parse_args().out)
