"""Time per call of :func:`solvers.chain_box.project_chain_box` (``refine=0`` and the default) against
``torch.softmax`` and :func:`solvers.project` on family c without its halfspace (family a + ``order_by(safety)``),
and the fraction of rows each certifies (with the largest distance of a certified row to ``solvers.project``).
``--row``: family c itself (the chain and its halfspace) and :func:`solvers.chain_box.project_chain_box_halfspace`
with the steps the compiled path takes. Prints a table and writes JSON (``--out``). The kernels are the compiled
path's (``torch.compile``: no host synchronisation); eager ``solvers.project`` keeps its general path for chains,
which is faster on one CPU thread.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_chain_box.py [--N 4096] [--K 4 8 16 32] [--logits] [--row]``.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from bench_projection import make_instance, write_results
from solvers import project
from solvers.chain_box import project_chain_box, project_chain_box_halfspace
from solvers.projection import _CHAIN_REFINE, _CHAIN_ROW_STEPS, _chain_of, _tolerance


def _per_call(fn: Callable[[], object], min_time: float = 0.5) -> float:
    """Median seconds per call of ``fn`` over repeats filling about ``min_time``."""
    fn()
    t0 = time.perf_counter()
    fn()
    reps = max(3, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--K", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--logits", action="store_true", help="v = 2·randn (off the simplex)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row", action="store_true", help="family c with its halfspace: the chain-and-row kernel")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_chain_box[_row].json)")
    args = p.parse_args()
    if args.row:
        _rows(args)
        return
    results = []
    torch.set_num_threads(1)
    dtype = torch.float64
    print(f"{'K':>3} {'softmax':>8} {'project':>8} {'box r=0':>8} {'box':>8} {'r=0/sm':>7} {'box/sm':>7} "
          f"{'r=0/pr':>7} {'box/pr':>7} {'cert r=0':>8} {'cert':>8} {'max |Δw|':>9}   (ms per call)")
    for K in args.K:
        v, fs = make_instance("a", K, args.N, dtype, torch.Generator().manual_seed(args.seed), logits=args.logits)
        # family c's safety scores: make_instance's first draw from the same seed
        safety = torch.randperm(K, generator=torch.Generator().manual_seed(args.seed)).to(dtype)
        fs = fs.order_by(safety, name="safety_order")
        e = fs.expand((args.N,))
        perm, links = _chain_of(fs, torch.Size([args.N]), e.A, torch.arange(args.N))
        lo, hi = e.lower.contiguous(), e.upper.contiguous()
        tol = _tolerance(dtype)
        exact = project(v, fs)
        cert, err, t_box = [], 0.0, []
        for kw in ({"refine": 0}, {}):
            res = project_chain_box(v, lo, hi, perm, links, tol=tol, **kw)
            cert.append(res.certified.double().mean().item())
            err = max(err, (res.w - exact).abs().amax(-1)[res.certified].max().item())
            t_box.append(_per_call(lambda: project_chain_box(v, lo, hi, perm, links, tol=tol, **kw)))
        t_soft = _per_call(lambda: torch.softmax(v, -1))
        t_proj = _per_call(lambda: project(v, fs))
        print(f"{K:>3} {t_soft * 1e3:>8.3f} {t_proj * 1e3:>8.2f} {t_box[0] * 1e3:>8.2f} {t_box[1] * 1e3:>8.2f} "
              f"{t_box[0] / t_soft:>7.1f} {t_box[1] / t_soft:>7.1f} "
              f"{t_box[0] / t_proj:>7.2f} {t_box[1] / t_proj:>7.2f} "
              f"{cert[0]:>8.4f} {cert[1]:>8.4f} {err:>9.1e}")
        results.append(dict(K=K, N=args.N, softmax_s=t_soft, project_s=t_proj, chain_box_refine0_s=t_box[0],
                            chain_box_s=t_box[1], certified_refine0=cert[0], certified=cert[1], max_abs_diff=err))
        write_results(args.out or "benchmarks/results/bench_chain_box.json", results, "cpu", logits=args.logits,
                      dtype="float64")


def _rows(args: argparse.Namespace) -> None:
    """``--row``: family c, :func:`project_chain_box_halfspace` (``_CHAIN_ROW_STEPS``, ``_CHAIN_REFINE``) against
    softmax and ``solvers.project``."""
    results = []
    torch.set_num_threads(1)
    dtype, tol = torch.float64, _tolerance(torch.float64)
    print(f"{'K':>3} {'softmax':>8} {'project':>8} {'kernel':>9} {'k/sm':>8} {'k/pr':>7} {'cert':>8} {'max |Δw|':>9}"
          "   (ms per call)")
    for K in args.K:
        v, fs = make_instance("c", K, args.N, dtype, torch.Generator().manual_seed(args.seed), logits=args.logits)
        e = fs.expand((args.N,))
        perm, links = _chain_of(fs, torch.Size([args.N]), e.A, torch.arange(args.N))
        row = K - 1 if fs.chain_start == 0 else 0
        data = (v, e.lower.contiguous(), e.upper.contiguous(), perm, links, e.A[:, row].contiguous(), e.b[:, row])

        def kernel():
            return project_chain_box_halfspace(*data, tol=tol, steps=_CHAIN_ROW_STEPS, refine=_CHAIN_REFINE)
        res, exact = kernel(), project(v, fs)
        cert = res.certified.double().mean().item()
        err = (res.w - exact).abs().amax(-1)[res.certified].max().item()
        t_soft, t_proj = _per_call(lambda: torch.softmax(v, -1)), _per_call(lambda: project(v, fs))
        t_kernel = _per_call(kernel)
        print(f"{K:>3} {t_soft * 1e3:>8.3f} {t_proj * 1e3:>8.2f} {t_kernel * 1e3:>9.1f} {t_kernel / t_soft:>8.0f} "
              f"{t_kernel / t_proj:>7.1f} {cert:>8.4f} {err:>9.1e}")
        results.append(dict(K=K, N=args.N, softmax_s=t_soft, project_s=t_proj, kernel_s=t_kernel, certified=cert,
                            max_abs_diff=err, steps=_CHAIN_ROW_STEPS, refine=_CHAIN_REFINE))
        write_results(args.out or "benchmarks/results/bench_chain_box_row.json", results, "cpu", logits=args.logits,
                      dtype="float64")


if __name__ == "__main__":
    main()
