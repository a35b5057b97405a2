"""Time of solvers.two_rows.project_box_two_halfspaces vs torch.softmax vs solvers.project on two-row sets.

The family: box (a cap on the least safe teacher, a floor on the safest) ∩ simplex ∩ the per-token unsafe-mass row
``p(U)·w ≤ ε`` (family ``b`` of ``benchmarks/bench_projection.py`` with ``--all-outside``: every token's bound
between its least value on box∩simplex and its value at the box∩simplex projection, so the row binds) ∩ a group cap
on the two least safe teachers (``Σ ≤ 0.5`` as in family ``d``). ``v`` on the simplex (composed weights), or
``--logits`` (``v = 2·randn``). One thread, float64; interleaved repetitions, medians of process time. Also printed:
the certified fraction of the kernel and the largest distance of its certified rows to ``solvers.project``.

    OMP_NUM_THREADS=1 python benchmarks/bench_two_rows.py            # N = 4096, K = 4 8 16 32
    OMP_NUM_THREADS=1 python benchmarks/bench_two_rows.py --logits

The kernel is the compiled path's for two rows (``torch.compile``: no host synchronisation); eager
``solvers.project`` keeps its general path for them. Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import platform

import torch

from bench_projection import _interleaved, make_instance, write_results
from solvers import FeasibleSet, project
from solvers.projection import _tolerance
from solvers.two_rows import project_box_two_halfspaces


def make_two_rows(K: int, N: int, gen: torch.Generator, logits: bool) -> tuple[torch.Tensor, FeasibleSet]:
    """Family ``b`` with ``--all-outside`` plus the group cap on the two least safe teachers (module doc)."""
    v, fs = make_instance("b", K, N, torch.float64, gen, logits=logits, all_outside=True)
    # make_instance's safety order is internal: the least safe teacher is the one capped (upper < 1) and the next
    # least safe is the one with the largest mean unsafe weight among the rest
    capped = int((fs.upper < 1).nonzero()[0, 0])
    a = fs.A.expand(N, 1, K)[:, 0].mean(0)
    a[capped] = -1.0
    second = int(a.argmax())
    return v, fs.group_cap([capped, second], 0.5, name="group")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--logits", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/bench_two_rows.json")
    args = p.parse_args()
    results = []
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    tol = _tolerance(torch.float64)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread, float64, "
          f"N = {args.N}, logits = {args.logits}, medians of {args.repeat} interleaved repetitions (process time)")
    print(f"{'K':>3} {'kernel ms':>10} {'softmax ms':>10} {'project ms':>10} {'kernel/softmax':>14} "
          f"{'project/kernel':>14} {'certified':>9} {'both bind':>9} {'max |Δw|':>9}")
    for K in args.K:
        v, fs = make_two_rows(K, args.N, gen, args.logits)
        N = v.shape[0]
        data = (v, fs.lower.expand(N, K).contiguous(), fs.upper.expand(N, K).contiguous(),
                fs.A.expand(N, 2, K).contiguous(), fs.b.expand(N, 2).contiguous())
        fns = {"kernel": lambda: project_box_two_halfspaces(*data, tol=tol),
               "softmax": lambda: torch.softmax(v, -1),
               "project": lambda: project(v, fs)}
        t = _interleaved(fns, args.repeat, torch.device("cpu"))
        res = project_box_two_halfspaces(*data, tol=tol)
        w, info = project(v, fs, return_info=True)
        ok = res.certified
        both = float(((info.multipliers > 1e-9).sum(-1) == 2).double().mean())
        dw = float((res.w[ok] - w[ok]).abs().max()) if bool(ok.any()) else float("nan")
        print(f"{K:>3} {t['kernel']*1e3:>10.2f} {t['softmax']*1e3:>10.3f} {t['project']*1e3:>10.2f} "
              f"{t['kernel']/t['softmax']:>14.1f} {t['project']/t['kernel']:>14.2f} "
              f"{float(ok.double().mean()):>9.4f} {both:>9.3f} {dw:>9.1e}")
        results.append(dict(K=K, N=N, kernel_s=t["kernel"], softmax_s=t["softmax"], project_s=t["project"],
                            certified=float(ok.double().mean()), both_bind=both, max_abs_diff=dw))
        write_results(args.out, results, "cpu", logits=args.logits, dtype="float64")


if __name__ == "__main__":
    main()
