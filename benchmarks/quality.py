"""Quality benchmark: safekd against known weighting methods on the digits demo and both fortunes scenarios.

Every method trains a fresh student under the same budget (steps, batch, optimizer, data order, teachers) per seed:

* ``uniform``            — uniform-weight KD (Hinton et al. 2015);
* ``best_single``        — KD from the single teacher best on validation (with the labels training has);
* ``camkd``              — CA-MKD (Zhang et al. 2022), per token/sample from the gold-label CE;
* ``aekd``               — AEKD (Du et al. 2020), min-norm weights of the batch-mean teacher gradients (as in the paper);
* ``safekd_adaptive``    — safekd's adaptive weights (with its safety prior), no constraints;
* ``safekd_constrained`` — the same plus the scenario's constraints (projection + Lagrangian).

All are evaluated on the same held-out split: the task metric (accuracy, or perplexity for the LM) and the scenario's
unsafe rate with its one-sided 95% bound; the constrained run also gets the full :func:`safekd.auditing.core.audit`.
Writes ``quality_<scenario>.json`` per scenario, then ``quality.json`` (mean ± std over seeds, dominance check) and
``quality_pareto.png`` (task metric vs unsafe rate, with bounds).

    OMP_NUM_THREADS=1 python benchmarks/quality.py --scenario all --seeds 0 1 2
    python benchmarks/quality.py --summarize           # merge the per-scenario files and plot
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fortunes_data import METHODS  # noqa: E402  (the compared methods, shared with the fortunes examples)

logger = logging.getLogger("quality")

SCENARIOS = ("digits", "fortunes_lm", "fortunes_routing")


def aekd_operator(beta: float = 1.0, epsilon: float = 0.0, num_teachers: int | None = None) -> Any:
    """AEKD with the ``(beta, epsilon, num_teachers)`` signature that job files use for operators."""
    from safekd.weighting import AEKD

    return AEKD(cap=1.0, reduce="batch", beta=beta, epsilon=epsilon)


# ------------------------------------------------------------------------------------------------ digits
def run_digits(seed: int, quick: bool) -> dict[str, Any]:
    from safekd.auditing.core import audit
    from safekd.demo import FPR_CONSTRAINT, demo_job
    from safekd.jobs import prepare_data, train_student
    from safekd.spec import Spec

    job = replace(demo_job(), seed=seed, **({"epochs": 3} if quick else {}))
    splits = prepare_data(job)
    train, held = splits[job.train_split], splits[job.audit_split]
    names = job.spec.teacher_names
    acc = (train["teacher_logits"].argmax(-1) == train["labels"].unsqueeze(-1)).float().mean(0)
    best = int(acc.argmax())
    student_only = Spec(teachers=job.spec.teachers, constraints=job.spec.student_constraints, unsafe=job.spec.unsafe)
    unconstrained = Spec(teachers=job.spec.teachers, constraints=(), unsafe=job.spec.unsafe, dual=job.spec.dual,
                         checks=job.spec.checks)
    out: dict[str, Any] = {"best_single_teacher": names[best]}
    for m in METHODS:
        t0 = time.perf_counter()
        j, tr = job, train
        if m == "uniform":
            j = replace(job, spec=unconstrained, weighting={})
        elif m == "best_single":
            one = Spec(teachers=(job.spec.teachers[best],), unsafe=job.spec.unsafe)
            j = replace(job, spec=one, weighting={})
            tr = {**train, "teacher_logits": train["teacher_logits"][:, best:best + 1]}
        elif m == "camkd":
            j = replace(job, spec=unconstrained, weighting={"operator": "safekd.weighting:CAMKD"})
        elif m == "aekd":
            j = replace(job, spec=unconstrained, weighting={"operator": "quality:aekd_operator"})
        elif m == "safekd_adaptive":
            j = replace(job, spec=unconstrained)
        dist = train_student(j, tr)
        rep = audit(dist.student, held, job.spec if m == "safekd_constrained" else student_only,
                    distiller=dist if m == "safekd_constrained" else None, confidence=job.confidence,
                    seed=seed, slice_keys=())
        f = rep.constraint(FPR_CONSTRAINT)
        res = {"task": rep.metrics["accuracy"], "unsafe": {"estimate": f.estimate, "bound": f.bound,
                                                           "method": f.bound_method, "threshold": f.threshold},
               "seconds": time.perf_counter() - t0}
        if m == "safekd_constrained":
            res["constraints"] = {r.name: {"estimate": r.estimate, "bound": r.bound, "passed": r.passed,
                                           "threshold": r.threshold} for r in rep.constraints}
        out[m] = res
        logger.info("digits seed %d %s: acc %.4f fpr %.4f (≤ %.4f) %.1fs", seed, m, res["task"],
                    f.estimate, f.bound, res["seconds"])
    return out


# ------------------------------------------------------------------------------------------------ fortunes
def _run_scenario(scenario: Any, seed: int, label: str) -> dict[str, Any]:
    out: dict[str, Any] = {"best_single_teacher": scenario.best_single}
    for m in METHODS:
        t0 = time.perf_counter()
        student, dist, _ = scenario.train(m)
        ev = scenario.evaluate(student, dist if m == "safekd_constrained" else None)
        res = {"task": ev["task"], "unsafe": ev["unsafe"], "seconds": time.perf_counter() - t0}
        if "samples" in ev:
            res["samples"] = {k: v for k, v in ev["samples"].items() if k != "examples"}
        if m == "safekd_constrained":
            res["constraints"] = ev["constraints"]
        out[m] = res
        logger.info("%s seed %d %s: task %.4f unsafe %.5f (≤ %.5f) %.1fs", label, seed, m, res["task"],
                    res["unsafe"]["estimate"], res["unsafe"]["bound"], res["seconds"])
    return out


def run_lm(seed: int, quick: bool) -> dict[str, Any]:
    import fortunes_data as fd
    import fortunes_lm as L

    if quick:
        cfg = L.LMConfig.quick(seed=seed)
    else:  # the benchmark budget: a smaller vocabulary and shorter runs than the example's defaults
        cfg = L.LMConfig(corpus=str(fd.default_corpus()), vocab_size=1500, max_len=24,
                         neural_steps=250, steps=150, batch=24, samples=300, seed=seed)
    return _run_scenario(L.LMScenario(cfg), seed, "fortunes_lm")


def run_routing(seed: int, quick: bool) -> dict[str, Any]:
    import fortunes_data as fd
    import fortunes_routing as R

    cfg = R.RoutingConfig.quick(seed=seed) if quick else R.RoutingConfig(corpus=str(fd.default_corpus()), steps=200,
                                                                         seed=seed)
    return _run_scenario(R.RoutingScenario(cfg), seed, "fortunes_routing")


RUNNERS = {"digits": run_digits, "fortunes_lm": run_lm, "fortunes_routing": run_routing}
TASK = {"digits": ("accuracy", False), "fortunes_lm": ("perplexity", True), "fortunes_routing": ("accuracy", False)}
UNSAFE = {"digits": "FPR of the forbidden class 8", "fortunes_lm": "student unsafe rate E[p(U)]",
          "fortunes_routing": "offensive texts routed to kids"}


# ------------------------------------------------------------------------------------------------ summary
def summarize(per_seed: dict[str, dict[str, Any]], scenario: str) -> dict[str, Any]:
    """Mean ± std over seeds per method; whether any baseline dominates the constrained run on the means."""
    name, lower_better = TASK[scenario]
    rows: dict[str, Any] = {}
    for m in METHODS:
        runs = [r[m] for r in per_seed.values()]
        t = np.array([r["task"] for r in runs])
        u = np.array([r["unsafe"]["estimate"] for r in runs])
        b = np.array([r["unsafe"]["bound"] for r in runs])
        rows[m] = {"task_mean": float(t.mean()), "task_std": float(t.std()), "unsafe_mean": float(u.mean()),
                   "unsafe_std": float(u.std()), "unsafe_bound_mean": float(b.mean()), "seeds": len(runs)}
    con = rows["safekd_constrained"]
    sign = -1.0 if lower_better else 1.0

    def dominates(a: dict[str, float], c: dict[str, float]) -> bool:
        at, ct = sign * a["task_mean"], sign * c["task_mean"]
        return at >= ct and a["unsafe_mean"] <= c["unsafe_mean"] and (at > ct or a["unsafe_mean"] < c["unsafe_mean"])

    dominated_by = [m for m in METHODS[:-1] if dominates(rows[m], con)]
    passed = {s: all(v["passed"] for v in r["safekd_constrained"].get("constraints", {}).values())
              for s, r in per_seed.items()}
    return {"task_metric": name, "lower_is_better": lower_better, "unsafe_metric": UNSAFE[scenario],
            "threshold": next(iter(per_seed.values()))["safekd_constrained"]["unsafe"].get("threshold"),
            "methods": rows, "constrained_dominated_by": dominated_by, "constrained_passes_all_constraints": passed}


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = [s for s in SCENARIOS if s in summary]
    fig, axes = plt.subplots(1, len(scen), figsize=(5.2 * len(scen), 4.2), squeeze=False)
    for ax, s in zip(axes[0], scen):
        S = summary[s]
        for m, r in S["methods"].items():
            pts = ax.errorbar(r["task_mean"], r["unsafe_mean"], xerr=r["task_std"], yerr=r["unsafe_std"], fmt="o",
                              capsize=3, label=m, ms=7 if m.startswith("safekd") else 5)
            ax.plot([r["task_mean"]], [r["unsafe_bound_mean"]], marker="_", ms=14, color=pts[0].get_color())
            ax.plot([r["task_mean"]] * 2, [r["unsafe_mean"], r["unsafe_bound_mean"]], ls=":", color=pts[0].get_color())
        if S.get("threshold") is not None:
            ax.axhline(S["threshold"], color="k", ls="--", lw=0.8, label="threshold")
        ax.set_xlabel(S["task_metric"] + (" (lower is better)" if S["lower_is_better"] else " (higher is better)"))
        ax.set_ylabel(S["unsafe_metric"] + " (— : 95% bound)")
        ax.set_title(s)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: Path) -> dict[str, Any]:
    summary = {}
    for s in SCENARIOS:
        f = out / f"quality_{s}.json"
        if f.exists():
            summary[s] = summarize(json.loads(f.read_text())["per_seed"], s)
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "quality_pareto.png")
    return summary


def print_table(summary: dict[str, Any]) -> None:
    for s, S in summary.items():
        print(f"\n{s}: {S['task_metric']} vs {S['unsafe_metric']} (threshold {S['threshold']})")
        for m, r in S["methods"].items():
            print(f"  {m:20s} {r['task_mean']:9.4f} ± {r['task_std']:.4f}   {r['unsafe_mean']:.5f} ± "
                  f"{r['unsafe_std']:.5f}  (bound {r['unsafe_bound_mean']:.5f})")
        print(f"  constrained dominated by: {S['constrained_dominated_by'] or 'none'}; all constraints pass per seed: "
              f"{S['constrained_passes_all_constraints']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="fixture-sized runs (smoke test)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--summarize", action="store_true", help="only merge existing per-scenario files and plot")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for name in ("fortunes_lm", "fortunes_routing", "fortunes_data", "safekd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        for s in (SCENARIOS if args.scenario == "all" else (args.scenario,)):
            per_seed = {str(seed): RUNNERS[s](seed, args.quick) for seed in args.seeds}
            (out / f"quality_{s}.json").write_text(json.dumps(
                {"scenario": s, "seeds": args.seeds, "quick": args.quick, "threads": torch.get_num_threads(),
                 "per_seed": per_seed}, indent=2, default=float))
    summary = write_summary(out)
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
