"""Per-vector time of solvers.project vs the cvxpy reference vs torch.softmax, side by side in one run.

For K ∈ {4, 8, 32}, N ∈ {4096, 262144}, float32/float64 on box∩simplex with one per-token halfspace
(the safekd hot case) and on box∩simplex alone. cvxpy is timed on a sample of ``--ref-sample`` vectors;
the fast path and softmax run on all N. Prints a table and writes JSON (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/bench_projection.py --out bench_projection.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from solvers import FeasibleSet, project, reference


def _time(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _set(K: int, N: int, dtype: torch.dtype, rows: bool, gen: torch.Generator) -> FeasibleSet:
    fs = FeasibleSet.simplex(K, dtype=dtype).cap(0, 0.3, name="cap").floor(1, 0.02, name="floor")
    if rows:
        a = torch.rand(N, K, generator=gen, dtype=torch.float64).to(dtype)
        fs = fs.halfspace(a, (0.25 + 0.25 * torch.rand(N, generator=gen, dtype=torch.float64)).to(dtype), name="unsafe")
    return fs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, nargs="+", default=[4, 8, 32])
    p.add_argument("--N", type=int, nargs="+", default=[4096, 262144])
    p.add_argument("--ref-sample", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="bench_projection.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"{'K':>3} {'N':>7} {'dtype':>8} {'rows':>4} {'project us/vec':>15} {'cvxpy us/vec':>13} {'softmax us/vec':>15} "
          f"{'speedup':>9} {'x softmax':>9} {'max|diff|':>10}")
    for K in args.K:
        for N in args.N:
            for dtype in (torch.float32, torch.float64):
                for rows in (False, True):
                    v = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype)
                    fs = _set(K, N, dtype, rows, gen)
                    reps = args.repeat if N <= 4096 else 1
                    t_proj = _time(lambda: project(v, fs), reps) / N
                    t_soft = _time(lambda: torch.softmax(v, -1), reps) / N
                    n = min(args.ref_sample, N)
                    fs_s = fs[:n] if fs.batch_shape else fs
                    t0 = time.perf_counter()
                    w_ref = reference.project(v[:n], fs_s)
                    t_ref = (time.perf_counter() - t0) / n
                    diff = float((project(v[:n], fs_s) - w_ref).abs().max())
                    row = dict(K=K, N=N, dtype=str(dtype).replace("torch.", ""), rows=int(rows), project_s_per_vec=t_proj,
                               reference_s_per_vec=t_ref, softmax_s_per_vec=t_soft, speedup_vs_reference=t_ref / t_proj,
                               ratio_to_softmax=t_proj / t_soft, max_abs_diff=diff, reference_sample=n)
                    results.append(row)
                    print(f"{K:>3} {N:>7} {row['dtype']:>8} {int(rows):>4} {t_proj*1e6:>15.3f} {t_ref*1e6:>13.1f} "
                          f"{t_soft*1e6:>15.4f} {t_ref/t_proj:>9.0f} {t_proj/t_soft:>9.1f} {diff:>10.2e}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
