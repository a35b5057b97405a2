"""Convex projection benchmark: the batched path (solvers.convex) vs a per-row cvxpy loop, and a token step.

1. Rows that need the conic solve (an entropy floor of 0.9·log K above nearly every row's polyhedral
   projection, a cap and one per-row halfspace): ``project_convex`` (the batched torch interior point, Newton
   polish, KKT verification) vs the same problem compiled once for ONE row (DPP) and re-solved row by row
   (Clarabel at the tight tolerances that ``project_convex`` uses without a polish). Compilation is timed apart
   (once per problem structure); the ratio compares warm solves, alternated, medians. Also timed:
   ``project_convex(..., interior_point=False)``, the block conic problems (one per chunk of ≤ 256 rows, Clarabel
   at loose tolerances, polish).
2. Clarabel's ``warm_start=True`` vs the default on the conic path (same rows, perturbed values).
3. A token-level distillation step (bench_step.py's setting) with ``min_entropy`` vs without, alternating steps.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_convex.py`` (or ``bench_projection.py --convex``); writes
benchmarks/results/bench_convex.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cvxpy as cp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from solvers import FeasibleSet  # noqa: E402
from solvers import convex as SC  # noqa: E402


def entropy_floor(w, p):
    return [cp.sum(cp.entr(w), axis=1) >= p["h"]]


def entropy_floor_t(w, p):
    return (p["h"] + (w * w.clamp_min(1e-300).log()).sum(-1))[:, None]


def _rows(K: int, N: int, floor: float = 0.9, seed: int = 0):
    rng = np.random.default_rng(seed)
    v = torch.tensor(rng.dirichlet(np.full(K, 0.3), size=N))
    a = torch.tensor(rng.uniform(0, 1, (N, K)))
    fs = FeasibleSet.simplex(K, dtype=torch.float64).cap(0, 0.6).halfspace(a, 0.9, name="row")
    h = torch.full((N,), floor * math.log(K), dtype=torch.float64)
    return v, fs, a, h


def per_row_loop(v: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """One row's problem compiled once (DPP), re-solved for every row: (w, compile s, solve s)."""
    N, K = v.shape
    w = cp.Variable(K)
    pv, pa, ph = cp.Parameter(K), cp.Parameter(K), cp.Parameter()
    cons = [cp.sum(w) == 1, w >= 0, w <= np.r_[0.6, np.ones(K - 1)], pa @ w <= 0.9, cp.sum(cp.entr(w)) >= ph]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(w) - pv @ w), cons)
    opts = SC._OPTS["CLARABEL"]
    out = np.zeros((N, K))
    t0 = time.perf_counter()
    pv.value, pa.value, ph.value = v[0].numpy(), a[0].numpy(), float(h[0])
    prob.solve(solver="CLARABEL", **opts)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(N):
        pv.value, pa.value, ph.value = v[i].numpy(), a[i].numpy(), float(h[i])
        prob.solve(solver="CLARABEL", **opts)
        out[i] = w.value
    return out, compile_s, time.perf_counter() - t0


def bench_rows(K: int, N: int, repeat: int) -> dict:
    v, fs, a, h = _rows(K, N)
    t0 = time.perf_counter()
    w, info = SC.project_convex(v, fs, entropy_floor, {"h": h}, values=entropy_floor_t, return_info=True)
    first = time.perf_counter() - t0
    w_c, info_c = SC.project_convex(v, fs, entropy_floor, {"h": h}, values=entropy_floor_t, return_info=True,
                                    interior_point=False)  # compiles the block conic problems
    batched, conic, loop = [], [], []
    for _ in range(repeat):  # alternating: machine load affects all alike
        t0 = time.perf_counter()
        SC.project_convex(v, fs, entropy_floor, {"h": h}, values=entropy_floor_t)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        SC.project_convex(v, fs, entropy_floor, {"h": h}, values=entropy_floor_t, interior_point=False)
        conic.append(time.perf_counter() - t0)
        w_loop, loop_compile, t_loop = per_row_loop(v, a, h)
        loop.append(t_loop)
    b, bc, lp = statistics.median(batched), statistics.median(conic), statistics.median(loop)
    return {"K": K, "rows": N, "conic_rows": int(info.conic.sum()), "statuses": info.message,
            "batched_s": b, "batched_first_call_s": first, "loop_s": lp, "loop_compile_s": loop_compile,
            "ratio": lp / b, "max_abs_diff_vs_loop": float(np.abs(w.numpy() - w_loop).max()),
            "max_kkt_residual": float(info.kkt_residual.max()),
            "batched_conic_only_s": bc, "ratio_conic_only": lp / bc,
            "max_abs_diff_vs_conic_only": float((w - w_c).abs().max()),
            "max_kkt_residual_conic_only": float(info_c.kkt_residual.max())}


def bench_warm_start(K: int, N: int, repeat: int) -> dict:
    v, fs, a, h = _rows(K, N)
    # Clarabel's option: the conic path (the interior point starts from each step's polyhedral projection)
    SC.project_convex(v, fs, entropy_floor, {"h": h}, values=entropy_floor_t, interior_point=False)  # compiled
    out = {}
    for ws in (False, True):
        times, ok = [], True
        for r in range(repeat):
            v2 = (v + 0.01 * r * torch.rand(v.shape, generator=torch.Generator().manual_seed(r))).clamp_min(0)
            t0 = time.perf_counter()
            _, info = SC.project_convex(v2, fs, entropy_floor, {"h": h}, values=entropy_floor_t, return_info=True,
                                        solver_opts={"warm_start": ws}, interior_point=False)
            times.append(time.perf_counter() - t0)
            ok &= info.success
        out[f"warm_start={ws}"] = {"s": statistics.median(times), "all_rows_verified": ok}
    return {"K": K, "rows": N, **out}


def bench_step(steps: int, floor: float) -> dict:
    spec_b = importlib.util.spec_from_file_location("bench_step", Path(__file__).with_name("bench_step.py"))
    bs = importlib.util.module_from_spec(spec_b)
    spec_b.loader.exec_module(bs)  # type: ignore[union-attr]
    from safekd.spec import constraints as C
    from safekd.training.distiller import SafeDistiller
    from safekd.spec.document import ChecksSpec, DualSpec, Spec, TeacherSpec
    from safekd.targets.weighting import ConfidenceSoftmax

    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randint(0, bs.V, (bs.B, bs.T), generator=g),
             "teacher_logits": 3 * torch.randn(bs.B, bs.T, bs.K, bs.V, generator=g)}
    teachers = [TeacherSpec(f"t{k}") for k in range(bs.K)]
    h = floor * math.log(bs.K)
    runs = {}
    for name, cons in (("without", [C.cap("t0", 0.6)]), ("min_entropy", [C.cap("t0", 0.6), C.min_entropy(h)])):
        torch.manual_seed(0)
        student = bs.SmallLM()
        spec = Spec(teachers=teachers, constraints=cons, dual=DualSpec(lr=0.1),
                    checks=ChecksSpec(reference_every=0, alarm_window=0))
        runs[name] = SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.01), spec,
                                   weighting=ConfidenceSoftmax(beta=4.0))
        runs[name].step(batch)  # warm-up (compiles the conic problems)
    times: dict[str, list[float]] = {n: [] for n in runs}
    rec = None
    for _ in range(steps):  # alternating: machine load affects both alike
        for n, d in runs.items():
            t0 = time.perf_counter()
            r = d.step(batch)
            times[n].append(time.perf_counter() - t0)
            rec = r if n == "min_entropy" else rec
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"tokens": bs.B * bs.T, "K": bs.K, "h": h, "step_s": med, "ratio_min_entropy_vs_without":
            med["min_entropy"] / med["without"], "conic_tokens_last_step": rec.projection["conic_tokens"],
            "min_entropy_last_step": rec.projection["convex"]["min_entropy"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, nargs="+", default=[4, 8])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--floor", type=float, default=0.7, help="min_entropy as a fraction of log K in the step")
    p.add_argument("--out", default="benchmarks/results/bench_convex.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": 1,
           "torch": torch.__version__, "cvxpy": cp.__version__, "load_average_1m": [os.getloadavg()[0]],
           "rows": [], "warm_start": None, "step": None}
    print(f"{'K':>3} {'rows':>5} {'conic':>5} {'batched s':>9} {'loop s':>8} {'ratio':>6} {'max|diff|':>9} "
          f"{'first call s':>12} {'conic-only s':>12} {'ratio':>6}")
    for K in args.K:
        for N in args.rows:
            r = bench_rows(K, N, args.repeat)
            out["rows"].append(r)
            print(f"{K:>3} {N:>5} {r['conic_rows']:>5} {r['batched_s']:>9.3f} {r['loop_s']:>8.3f} "
                  f"{r['ratio']:>5.1f}x {r['max_abs_diff_vs_loop']:>9.1e} {r['batched_first_call_s']:>12.2f} "
                  f"{r['batched_conic_only_s']:>12.3f} {r['ratio_conic_only']:>5.1f}x")
    out["warm_start"] = bench_warm_start(max(args.K), max(args.rows), args.repeat)
    print("warm start:", {k: v for k, v in out["warm_start"].items() if k.startswith("warm")})
    out["step"] = bench_step(args.steps, args.floor)
    s = out["step"]
    print(f"token step ({s['tokens']} tokens, K={s['K']}): without {s['step_s']['without']:.3f} s, min_entropy "
          f"{s['step_s']['min_entropy']:.3f} s, ratio {s['ratio_min_entropy_vs_without']:.2f}x "
          f"({s['conic_tokens_last_step']} conic tokens)")
    out["load_average_1m"].append(os.getloadavg()[0])  # at the start and at the end (a shared machine)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
