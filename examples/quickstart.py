"""safekd in one page: five real teachers (one biased), a capped and safety-constrained student, an audit.

    python examples/quickstart.py          # 11 s CPU, 0.49 GB (2-core x86-64, 1 thread); ./quickstart-report/
"""
import torch

from safekd.spec import constraints as C
from safekd.auditing import audit, write_report
from safekd.data.digits import FUNCTIONS, digits_splits, digits_student, digits_teacher_fns
from safekd.training.distiller import SafeDistiller
from safekd.spec.document import Spec, TeacherSpec
from safekd.spec.unsafe import UnsafeSet
from safekd.targets.weighting import ConfidenceSoftmax, SafetyPrior


def main(epochs: int = 40, out: str = "quickstart-report") -> bool:
    torch.set_num_threads(1)                             # many small ops: 5x faster than 2 threads on 2 cores
    torch.manual_seed(0)
    splits = digits_splits(seed=0)                       # sklearn digits: teacher / distill / heldout
    teachers = digits_teacher_fns(splits, seed=0)        # {name: inputs -> logits}: logreg, mlp, cnn, knn, biased

    spec = Spec(
        teachers=[TeacherSpec(n, safety=0.0 if n == "biased" else 1.0) for n in teachers],
        unsafe=UnsafeSet(fn=FUNCTIONS["forbidden_when_wrong"]),            # class 8 is unsafe unless the label is 8
        constraints=[
            C.cap("biased", 0.05),                                          # teacher weight: w_biased <= 0.05
            C.unsafe_mass(0.35, name="target_unsafe_mass"),                 # pooled target: q(8 | wrong) <= 0.35
            C.metric(FUNCTIONS["forbidden_fpr"], "<=", 0.04,                # student: P(predict 8 | label != 8)
                     proxy=FUNCTIONS["forbidden_fpr_proxy"], name="forbidden_fpr"),
        ])

    student = digits_student(seed=0)
    distiller = SafeDistiller(student, teachers, torch.optim.Adam(student.parameters(), lr=3e-3), spec,
                              weighting=SafetyPrior(ConfidenceSoftmax(beta=4.0, num_teachers=5), gamma=0.1))
    train = splits["distill"]
    for _ in range(epochs):
        for idx in torch.randperm(len(train["labels"])).split(64):
            distiller.step({"inputs": train["inputs"][idx], "labels": train["labels"][idx]})

    report = audit(student, splits["heldout"], spec, distiller=distiller, confidence=0.95)
    print(report.message)
    print(report.summary_table())
    print("report:", write_report(report, out)["html"])
    return report.passed


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
