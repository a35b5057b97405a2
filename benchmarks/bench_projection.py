"""Per-vector time of solvers.project vs the cvxpy reference vs torch.softmax, side by side in one run.

Families of feasible sets (the safekd training loop's typical sets), ``v`` on the simplex (composed weights):

* ``a``: box caps/floors only;
* ``b``: (a) + one per-token halfspace ``p(U)·w ≤ ε`` (unsafe mass), ``ε`` set so that ``--violated`` of the
  tokens violate it at the box∩simplex projection;
* ``c``: (b) + ``order_by(safety)`` (K−1 ordinal rows); ``v`` follows the safety order on most tokens;
* ``d``: (c) + a group cap on the two least safe teachers.

``--logits`` draws ``v = 2·randn`` instead (off the simplex, random order: many more rows need work).

The fast path and softmax run on all N; cvxpy on a sample of ``--ref-sample`` vectors. Prints a table and writes
JSON (``--out``) with µs/vector, the fraction of tokens infeasible at the box∩simplex projection, and the mean /
max iteration counts and status counts reported by ``project``.

    OMP_NUM_THREADS=1 python benchmarks/bench_projection.py   # writes benchmarks/results/bench_projection.json
    python benchmarks/bench_projection.py --device cuda --out bench_projection_cuda.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from solvers import FeasibleSet, Status, project, reference

FAMILIES = ("a", "b", "c", "d")


def _time(fn, repeat: int, device: torch.device) -> float:
    """Mean seconds per call over ``repeat`` calls after one warm-up call (a call over 1 s is its own measure);
    on CUDA the device is synchronised before each clock reading."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if first > 1.0:
        return first
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def make_instance(family: str, K: int, N: int, dtype: torch.dtype, gen: torch.Generator,
                  violated: float = 0.2, logits: bool = False) -> tuple[torch.Tensor, FeasibleSet]:
    """``(v [N, K], set)`` of ``family`` ∈ {a, b, c, d} (see the module docstring); built in float64, cast once.
    ``logits``: ``v = 2·randn`` (off the simplex, random order: the harder case of a projected-gradient step)."""
    f64 = torch.float64
    safety = torch.randperm(K, generator=gen).to(f64)  # higher = safer
    order = safety.argsort(descending=True)
    scores = (1.5 * torch.randn(N, K, generator=gen, dtype=f64)).sort(-1, descending=True).values
    v_sorted = torch.softmax(scores, -1)
    v = torch.empty_like(v_sorted).scatter_(-1, order.expand(N, K), v_sorted)  # follows the safety order
    shuffle = torch.rand(N, generator=gen, dtype=f64) < violated
    noisy = torch.softmax(1.5 * torch.randn(N, K, generator=gen, dtype=f64), -1)
    v = torch.where(shuffle[:, None], noisy, v)
    if logits:
        v = 2.0 * torch.randn(N, K, generator=gen, dtype=f64)
    fs = FeasibleSet.simplex(K, dtype=f64).cap(int(order[-1]), 0.45, name="cap").floor(int(order[0]), 0.02, name="floor")
    if family in ("b", "c", "d"):
        a = 0.3 * torch.rand(N, K, generator=gen, dtype=f64)
        a[:, order[-1]] += 0.3  # the least safe teacher puts more mass on unsafe tokens, the safest little
        a[:, order[0]] *= 0.1
        w0 = project(v, fs)
        eps = torch.quantile((a * w0).sum(-1), 1.0 - violated)
        fs = fs.halfspace(a, eps.expand(N), name="unsafe_mass")
    if family in ("c", "d"):
        fs = fs.order_by(safety, name="safety_order")
    if family == "d":
        fs = fs.group_cap([int(order[-1]), int(order[-2])], 0.5, name="group")
    return v.to(dtype), fs.to(dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, nargs="+", default=[4, 8, 32])
    p.add_argument("--N", type=int, nargs="+", default=[4096, 262144])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--violated", type=float, default=0.2, help="target fraction of tokens violating the halfspace")
    p.add_argument("--logits", action="store_true", help="v = 2·randn instead of weights that follow the safety order")
    p.add_argument("--ref-sample", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu", help="torch device for project and softmax (cvxpy runs on the CPU)")
    p.add_argument("--out", default="benchmarks/results/bench_projection.json")
    p.add_argument("--convex", action="store_true", help="run benchmarks/bench_convex.py (convex path vs per-row cvxpy)")
    args = p.parse_args()
    if args.convex:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("bench_convex", Path(__file__).with_name("bench_convex.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module.main([])
    torch.set_num_threads(1)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"{'fam':>3} {'K':>3} {'N':>6} {'dtype':>8} {'viol':>5} {'project us':>10} {'it mean':>7} {'it max':>6} "
          f"{'cvxpy us':>9} {'softmax us':>10} {'x cvxpy':>8} {'x softmax':>9} {'max|diff|':>9}  status")
    for family in args.families:
        for K in args.K:
            for N in args.N:
                for name in args.dtypes:
                    dtype = getattr(torch, name)
                    v, fs = make_instance(family, K, N, dtype, gen, args.violated, args.logits)
                    v, fs = v.to(device), fs.to(device=device)
                    infeasible = float((~fs.contains(project(v, FeasibleSet(fs.lower, fs.upper, fs.A[..., :0, :],
                                                                                    fs.b[..., :0], ())), tol=1e-6 if dtype == torch.float32 else 1e-12)).double().mean())
                    reps = args.repeat if N <= 4096 else 1
                    t_proj = _time(lambda: project(v, fs), reps, device) / N
                    t_soft = _time(lambda: torch.softmax(v, -1), reps, device) / N
                    _, info = project(v, fs, return_info=True)
                    n = min(args.ref_sample, N)
                    fs_s = fs[:n] if fs.batch_shape else fs
                    t0 = time.perf_counter()
                    w_ref = reference.project(v[:n].double(), fs_s.to(dtype=torch.float64))
                    t_ref = (time.perf_counter() - t0) / n
                    diff = float((project(v[:n], fs_s).double() - w_ref).abs().max())
                    status = {s.name: int((info.status == int(s)).sum()) for s in Status if bool((info.status == int(s)).any())}
                    row = dict(family=family, K=K, N=N, m=fs.num_rows, dtype=name, infeasible_fraction=infeasible,
                               project_s_per_vec=t_proj, reference_s_per_vec=t_ref, softmax_s_per_vec=t_soft,
                               speedup_vs_reference=t_ref / t_proj, ratio_to_softmax=t_proj / t_soft,
                               iterations_mean=float(info.iterations.double().mean()),
                               iterations_max=int(info.iterations.max()), status=status, max_abs_diff=diff,
                               reference_sample=n)
                    results.append(row)
                    _write(args, results)  # after every row: a long grid keeps what it measured
                    print(f"{family:>3} {K:>3} {N:>6} {name:>8} {infeasible:>5.2f} {t_proj*1e6:>10.3f} "
                          f"{row['iterations_mean']:>7.2f} {row['iterations_max']:>6d} {t_ref*1e6:>9.1f} {t_soft*1e6:>10.4f} "
                          f"{t_ref/t_proj:>8.0f} {t_proj/t_soft:>9.1f} {diff:>9.2e}  {status}", flush=True)


def _write(args: argparse.Namespace, results: list[dict]) -> None:
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "device": _device_name(args.device),
                   "logits": args.logits,
                   "violated": args.violated, "results": results}, f, indent=1)


def _device_name(device: str) -> str:
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
