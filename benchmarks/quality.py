"""Quality benchmark: safekd against known weighting methods, every method tuned by the same protocol.

Methods (one fresh student each, same steps, batch, optimizer, data order and teachers per seed):

* ``uniform``            — uniform-weight KD (Hinton et al. 2015);
* ``best_single``        — KD from the single teacher best on validation (with the labels training has);
* ``camkd``              — CA-MKD (Zhang et al. 2022), per token/sample from the gold-label CE;
* ``aekd``               — AEKD (Du et al. 2020), min-norm weights of the batch-mean teacher gradients;
* ``safekd_adaptive``    — safekd's adaptive weights (with its safety prior), no constraints;
* ``safekd_constrained`` — the same plus the scenario's constraints (projection + Lagrangian);
* ``safekd_constrained_best_operator`` — the scenario's constraints on the unconstrained operator (uniform, CA-MKD,
  AEKD or safekd's) that won validation on that seed: constraints compose with any weighting.

Protocol (docs/quality.md): per seed and method, the same budget of settings (student learning rate × 0.5, 1, 2;
× 1, 2 for the LM);
each is trained and scored on the validation split; the setting is chosen by one rule for every method (best
validation task metric among settings whose validation unsafe rate is within the scenario's threshold, else the
safest); only the chosen student is evaluated on the held-out split, once (the constrained ones with the full audit).
Over seeds: mean ± 95% t-interval; dominance from paired t-intervals of the per-seed differences.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --scenario all --seeds 0 1 2 3 4
    python benchmarks/quality.py --summarize           # merge the per-scenario files, table and plots
    python benchmarks/quality.py --merge /tmp/b/quality_fortunes_lm.json   # seeds run elsewhere with --out /tmp/b
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from quality_scenarios import BENCHES, CONSTRAINED, METHODS, OPERATORS, Bench, Trained
from quality_stats import dominated_by, interval_row, select_setting

logger = logging.getLogger("quality")

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("digits", "fortunes_routing", "fortunes_lm")
# the settings budget per scenario (student learning rate × the scenario's default), the same for every method;
# the LM gets two settings so that five seeds fit the shared CPU
LR_MULTIPLIERS = {"digits": (0.5, 1.0, 2.0), "fortunes_routing": (0.5, 1.0, 2.0), "fortunes_lm": (1.0, 2.0)}
BEST_OPERATOR = "safekd_constrained_best_operator"
ALL_METHODS = (*METHODS, BEST_OPERATOR)


# ------------------------------------------------------------------------------------------------ protocol
def tune(bench: Bench, multipliers: tuple[float, ...], method: str, operator: str | None = None) -> dict[str, Any]:
    """Train ``method`` at every setting, choose on validation, evaluate the chosen student on held-out once."""
    t0 = time.perf_counter()
    runs: list[Trained] = []
    val: list[dict[str, Any]] = []
    for mult in multipliers:
        lr = bench.base_lr * mult
        trained = bench.train(method, lr, operator)
        ev = bench.evaluate(trained, "val", audit=False)
        runs.append(trained)
        val.append({"lr": lr, "task": ev["task"], "unsafe": ev["unsafe"]["estimate"], "bound": ev["unsafe"]["bound"]})
    i = select_setting(val, bench.threshold, bench.lower_is_better)
    test = bench.evaluate(runs[i], "test", audit=method == CONSTRAINED)
    return {**test, "lr": val[i]["lr"], "chosen": i, "validation": val, "seconds": time.perf_counter() - t0}


def run_seed(bench: Bench, multipliers: tuple[float, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"best_single_teacher": bench.best_single}
    for m in METHODS:
        out[m] = tune(bench, multipliers, m)
        _log(m, out[m])
    chosen = {m: out[m]["validation"][out[m]["chosen"]]["task"] for m in OPERATORS}
    sign = -1.0 if bench.lower_is_better else 1.0
    op = max(OPERATORS, key=lambda m: sign * chosen[m])
    if op == "safekd_adaptive":  # its own operator: the same run as safekd_constrained
        out[BEST_OPERATOR] = {**out[CONSTRAINED], "operator": op}
    else:
        out[BEST_OPERATOR] = {**tune(bench, multipliers, CONSTRAINED, op), "operator": op}
    _log(f"{BEST_OPERATOR}[{op}]", out[BEST_OPERATOR])
    return out


def _log(name: str, r: dict[str, Any]) -> None:
    audit = "" if "constraints" not in r else f" audit {'PASS' if all_passed(r) else 'FAIL'}"
    logger.info("  %-40s lr %.4g: task %.4f unsafe %.5f (≤ %.5f)%s %.1fs", name, r["lr"], r["task"],
                r["unsafe"]["estimate"], r["unsafe"]["bound"], audit, r["seconds"])


def all_passed(r: dict[str, Any]) -> bool:
    return all(c["passed"] for c in r["constraints"].values())


def run_scenario(scenario: str, seeds: list[int], quick: bool, corpus: str | None, out: Path) -> None:
    """Run the seeds not yet in ``quality_<scenario>.json`` (same ``quick`` and settings), writing the file after
    each seed."""
    path = out / f"quality_{scenario}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    multipliers = LR_MULTIPLIERS[scenario]
    if doc.get("quick") != quick or doc.get("lr_multipliers") != list(multipliers):
        doc = {"scenario": scenario, "quick": quick, "lr_multipliers": list(multipliers), "per_seed": {}}
    for seed in seeds:
        if str(seed) in doc["per_seed"]:
            continue
        t0 = time.perf_counter()
        bench = BENCHES[scenario](seed, quick, corpus)
        logger.info("%s seed %d: teachers ready in %.1fs", scenario, seed, time.perf_counter() - t0)
        doc["per_seed"][str(seed)] = {**run_seed(bench, multipliers), "seconds": time.perf_counter() - t0}
        doc.update(corpus=bench.corpus, threads=torch.get_num_threads(), task_metric=bench.task_metric,
                   lower_is_better=bench.lower_is_better, unsafe_metric=bench.unsafe_metric, threshold=bench.threshold)
        path.write_text(json.dumps(doc, indent=2, default=float))


def merge(files: list[str], out: Path) -> None:
    """Add the seeds of other runs' ``quality_<scenario>.json`` (seeds split across processes with ``--out``) to
    ``out``'s file of the same scenario; the settings budget and ``quick`` must match."""
    for f in files:
        part = json.loads(Path(f).read_text())
        path = out / f"quality_{part['scenario']}.json"
        doc = json.loads(path.read_text()) if path.exists() else {**part, "per_seed": {}}
        if (doc["quick"], doc["lr_multipliers"], doc.get("corpus")) != (part["quick"], part["lr_multipliers"],
                                                                        part.get("corpus")):
            raise ValueError(f"{f}: another budget, corpus or --quick than {path}; not merged")
        doc["per_seed"].update(part["per_seed"])
        doc.update({k: v for k, v in part.items() if k != "per_seed"})
        path.write_text(json.dumps(doc, indent=2, default=float))


# ------------------------------------------------------------------------------------------------ summary
def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Per method: mean ± 95% t-interval of the task metric, the unsafe rate and its bound; who dominates whom."""
    seeds = sorted(doc["per_seed"], key=int)
    runs = {m: [doc["per_seed"][s][m] for s in seeds] for m in ALL_METHODS}
    values = {m: {"task": [r["task"] for r in rs], "unsafe": [r["unsafe"]["estimate"] for r in rs]}
              for m, rs in runs.items()}
    lower = doc["lower_is_better"]
    rows = {}
    for m, rs in runs.items():
        rows[m] = {"task": interval_row(values[m]["task"]), "unsafe": interval_row(values[m]["unsafe"]),
                   "unsafe_bound": interval_row([r["unsafe"]["bound"] for r in rs]),
                   "lr_chosen": [r["lr"] for r in rs],
                   "dominated_by": dominated_by(values, m, lower) if len(seeds) > 1 else None}
        if m == BEST_OPERATOR:
            rows[m]["operator"] = [r["operator"] for r in rs]
    audits = {m: {s: all_passed(r) for s, r in zip(seeds, runs[m])} for m in (CONSTRAINED, BEST_OPERATOR)}
    return {"task_metric": doc["task_metric"], "lower_is_better": lower, "unsafe_metric": doc["unsafe_metric"],
            "threshold": doc["threshold"], "seeds": [int(s) for s in seeds], "quick": doc["quick"],
            "lr_multipliers": doc["lr_multipliers"], "methods": rows,
            "constrained_dominated_by": rows[CONSTRAINED]["dominated_by"],
            "best_operator_constrained_dominated_by": rows[BEST_OPERATOR]["dominated_by"],
            "constrained_audits_pass": audits,
            "all_constrained_audits_pass": all(v for a in audits.values() for v in a.values()),
            "seconds": sum(doc["per_seed"][s]["seconds"] for s in seeds)}


def plot(name: str, S: dict[str, Any], path: Path) -> None:
    """Task metric vs unsafe rate (means with 95% t-intervals; the triangle marks the mean one-sided 95% bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for m, r in S["methods"].items():
        t, u, b = r["task"], r["unsafe"], r["unsafe_bound"]
        pts = ax.errorbar(t["mean"], u["mean"], xerr=t["ci95"], yerr=u["ci95"], capsize=3, label=m,
                          fmt="s" if m == BEST_OPERATOR else "o", ms=8 if m.startswith(CONSTRAINED) else 5)
        color = pts[0].get_color()
        ax.plot([t["mean"]], [b["mean"]], marker="v", ms=6, color=color)
        ax.plot([t["mean"]] * 2, [u["mean"], b["mean"]], ls=":", color=color)
    ax.axhline(S["threshold"], color="k", ls="--", lw=0.8, label="threshold")
    ax.set_xlabel(S["task_metric"] + (" (lower is better)" if S["lower_is_better"] else " (higher is better)"))
    ax.set_ylabel("unsafe rate (▼: mean one-sided 95% upper bound)")
    ax.set_title(f"{name}: {len(S['seeds'])} seeds, mean ± 95% t-interval", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: Path) -> dict[str, Any]:
    summary = {}
    for s in SCENARIOS:
        f = out / f"quality_{s}.json"
        if f.exists():
            summary[s] = summarize(json.loads(f.read_text()))
            plot(s, summary[s], out / f"quality_pareto_{s}.png")
    summary["skipped"] = {"fortunes_lm_sparse": "the sparse-teacher LM path (real BPE vocabulary) is not merged yet"}
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    return summary


def _fmt(r: dict[str, Any], digits: int) -> str:
    half = "n/a" if r["ci95"] is None else f"{r['ci95']:.{digits}f}"
    return f"{r['mean']:.{digits}f} ± {half}"


def print_table(summary: dict[str, Any]) -> None:
    for s in SCENARIOS:
        if s not in summary:
            continue
        S = summary[s]
        print(f"\n{s} ({len(S['seeds'])} seeds): {S['task_metric']} vs {S['unsafe_metric']} "
              f"(threshold {S['threshold']})")
        print(f"  {'method':34s} {S['task_metric']:>18s} {'unsafe':>20s} {'95% bound':>20s}  dominated by")
        for m, r in S["methods"].items():
            print(f"  {m:34s} {_fmt(r['task'], 4):>18s} {_fmt(r['unsafe'], 5):>20s} {_fmt(r['unsafe_bound'], 5):>20s}"
                  f"  {r['dominated_by']}")
        print(f"  constrained dominated by: {S['constrained_dominated_by']}; every constrained audit passes: "
              f"{S['all_constrained_audits_pass']}; {S['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--quick", action="store_true", help="fixture-sized runs (smoke test)")
    p.add_argument("--corpus", default=None,
                   help="fortunes directory (default: /usr/share/games/fortunes when installed, else the test fixture)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--summarize", action="store_true", help="only merge existing per-scenario files and plot")
    p.add_argument("--merge", nargs="+", default=[], metavar="FILE",
                   help="add the seeds of these quality_<scenario>.json files (other --out runs) first")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for name in ("fortunes_lm", "fortunes_routing", "fortunes_data", "safekd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merge(args.merge, out)
    if not args.summarize and not args.merge:
        for s in (SCENARIOS if args.scenario == "all" else (args.scenario,)):
            run_scenario(s, args.seeds, args.quick, args.corpus, out)
    summary = write_summary(out)
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
