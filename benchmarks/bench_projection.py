"""Per-vector time of solvers.project vs the cvxpy reference vs torch.softmax, side by side in one run.

Families of feasible sets (the safekd training loop's typical sets), ``v`` on the simplex (composed weights):

* ``a``: box caps/floors only;
* ``b``: (a) + one per-token halfspace ``p(U)·w ≤ ε`` (unsafe mass), ``ε`` set so that ``--violated`` of the
  tokens violate it at the box∩simplex projection;
* ``c``: (b) + ``order_by(safety)`` (K−1 ordinal rows); ``v`` follows the safety order on most tokens;
* ``d``: (c) + a group cap on the two least safe teachers.

``--logits`` draws ``v = 2·randn`` instead (off the simplex, random order: many more rows need work).
``--all-outside``: every token's halfspace bound is drawn between its least value on box∩simplex and its value at
the box∩simplex projection, so every row is outside its (non-empty) set and needs the row's multiplier.

``project``, ``torch.softmax`` over the same ``[N, K]`` tensor and a DAQP loop (one ``daqp.solve`` per vector from
Python, on ``--daqp-sample`` vectors; ``pip install daqp``, the ``bench`` extra) are timed in interleaved
repetitions and compared by their medians; cvxpy (Clarabel) runs once on ``--ref-sample`` vectors. Also measured:
the backward through the projection over its forward (``v.requires_grad``), the largest KKT residual and the largest
distance to a tight cvxpy solve. Prints a table and writes JSON (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/bench_projection.py   # writes benchmarks/results/bench_projection.json
    OMP_NUM_THREADS=1 python benchmarks/bench_projection.py --all-outside --families b --K 4 8 16 32 --dtypes float64
    python benchmarks/bench_projection.py --device cuda --out bench_projection_cuda.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from solvers import FeasibleSet, Status, project, reference
from solvers.projection import _argmin_linear

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
                  violated: float = 0.2, logits: bool = False, all_outside: bool = False) -> tuple[torch.Tensor, FeasibleSet]:
    """``(v [N, K], set)`` of ``family`` ∈ {a, b, c, d} (see the module docstring); built in float64, cast once.
    ``logits``: ``v = 2·randn`` (off the simplex, random order: the harder case of a projected-gradient step).
    ``all_outside``: the halfspace bound per token between ``min_{box∩Δ} a·w`` and ``a·w₀`` (every row outside)."""
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
        eps = torch.quantile((a * w0).sum(-1), 1.0 - violated).expand(N)
        if all_outside:
            lo, hi = fs.lower.expand(N, K), fs.upper.expand(N, K)
            a_min = (a * _argmin_linear(a[:, None], lo, hi)[:, 0]).sum(-1)
            q = 0.05 + 0.9 * torch.rand(N, generator=gen, dtype=f64)
            eps = a_min + q * ((a * w0).sum(-1) - a_min)
        fs = fs.halfspace(a, eps, name="unsafe_mass")
    if family in ("c", "d"):
        fs = fs.order_by(safety, name="safety_order")
    if family == "d":
        fs = fs.group_cap([int(order[-1]), int(order[-2])], 0.5, name="group")
    return v.to(dtype), fs.to(dtype=dtype)


def _daqp_loop(v: torch.Tensor, fs: FeasibleSet):
    """One ``daqp.solve`` per vector from Python (``min ½‖w − v‖²``: ``H = I``, ``f = −v``; bounds, ``Σw = 1`` as an
    equality, rows ``A w ≤ b``); returns a function of no arguments that solves them all and the solutions."""
    import daqp
    import numpy as np

    n, K = v.shape
    fs = fs.expand((n,)) if fs.batch_shape != (n,) else fs
    vs, lo, hi = (t.double().cpu().numpy() for t in (v, fs.lower, fs.upper))
    A, b = fs.A.double().cpu().numpy(), fs.b.double().cpu().numpy()
    H = np.eye(K)
    m = A.shape[1]
    sense = np.array([0] * K + [5] + [0] * m, dtype=np.int32)
    problems = [(-vs[i], np.vstack([np.ones((1, K)), A[i]]), np.concatenate([hi[i], [1.0], b[i]]),
                 np.concatenate([lo[i], [1.0], np.full(m, -1e30)])) for i in range(n)]
    out = np.zeros((n, K))

    def run() -> np.ndarray:
        for i, (f, Ai, bu, bl) in enumerate(problems):
            out[i] = daqp.solve(H, f, Ai, bu, bl, sense, primal_tol=1e-12)[0]
        return out

    return run


def _interleaved(fns: dict, repeat: int, device: torch.device) -> dict:
    """Median seconds per call of each function, the calls interleaved (one of each per repetition, after a warm-up
    round) so that machine load affects all alike. CPU: process time (the time this process ran: other processes
    on a shared machine do not count); CUDA: wall clock, the device synchronised around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict = {k: [] for k in fns}
    for r in range(repeat + 1):
        for k, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            if r:
                times[k].append(clock() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--N", type=int, nargs="+", default=[4096])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--violated", type=float, default=0.2, help="target fraction of tokens violating the halfspace")
    p.add_argument("--logits", action="store_true", help="v = 2·randn instead of weights that follow the safety order")
    p.add_argument("--all-outside", action="store_true", help="every row outside its set (the halfspace binds)")
    p.add_argument("--ref-sample", type=int, default=50)
    p.add_argument("--daqp-sample", type=int, default=500, help="vectors per DAQP loop (0: no DAQP baseline)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--device", default="cpu", help="torch device for project and softmax (cvxpy runs on the CPU)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_projection[_all_outside].json)")
    p.add_argument("--convex", action="store_true", help="run benchmarks/bench_convex.py (convex path vs per-row cvxpy)")
    args = p.parse_args()
    if args.convex:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("bench_convex", Path(__file__).with_name("bench_convex.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module.main([])
    if args.out is None:
        args.out = "benchmarks/results/bench_projection" + ("_all_outside" if args.all_outside else "") + ".json"
    torch.set_num_threads(1)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"{'fam':>3} {'K':>3} {'N':>6} {'dtype':>8} {'viol':>5} {'project us':>10} {'softmax us':>10} {'daqp us':>8} "
          f"{'cvxpy us':>9} {'x softmax':>9} {'x daqp':>7} {'x cvxpy':>8} {'bwd/fwd':>7} {'max kkt':>8} {'max|diff|':>9}"
          f"  status")
    for family in args.families:
        for K in args.K:
            for N in args.N:
                for name in args.dtypes:
                    dtype = getattr(torch, name)
                    v, fs = make_instance(family, K, N, dtype, gen, args.violated, args.logits, args.all_outside)
                    v, fs = v.to(device), fs.to(device=device)
                    box = FeasibleSet(fs.lower, fs.upper, fs.A[..., :0, :], fs.b[..., :0], ())
                    infeasible = float((~fs.contains(project(v, box), tol=1e-6 if dtype == torch.float32 else 1e-12))
                                       .double().mean())
                    n_daqp = min(args.daqp_sample, N)
                    vg = v.clone().requires_grad_(True)
                    gout = torch.randn_like(v)
                    fns = {"project": lambda: project(v, fs), "softmax": lambda: torch.softmax(v, -1),
                           "forward_grad": lambda: project(vg, fs),
                           "backward": lambda: torch.autograd.grad(project(vg, fs), vg, gout)}
                    if n_daqp and device.type == "cpu":
                        fns["daqp"] = _daqp_loop(v[:n_daqp], fs[:n_daqp] if fs.batch_shape else fs)
                    med = _interleaved(fns, args.repeat if N <= 4096 else 1, device)
                    t_proj, t_soft = med["project"] / N, med["softmax"] / N
                    t_bwd = max(med["backward"] - med["forward_grad"], 0.0)  # grad() runs forward + backward
                    t_daqp = med["daqp"] / n_daqp if "daqp" in med else float("nan")
                    _, info = project(v, fs, return_info=True)
                    n = min(args.ref_sample, N)
                    fs_s = fs[:n] if fs.batch_shape else fs
                    clock = time.perf_counter if device.type == "cuda" else time.process_time
                    t0 = clock()
                    w_ref = reference.project(v[:n].double(), fs_s.to(dtype=torch.float64))
                    t_ref = (clock() - t0) / n
                    diff = float((project(v[:n], fs_s).double() - w_ref).abs().max())
                    status = {s.name: int((info.status == int(s)).sum()) for s in Status if bool((info.status == int(s)).any())}
                    row = dict(family=family, K=K, N=N, m=fs.num_rows, dtype=name, all_outside=args.all_outside,
                               infeasible_fraction=infeasible, project_s_per_vec=t_proj, reference_s_per_vec=t_ref,
                               softmax_s_per_vec=t_soft, daqp_s_per_vec=t_daqp, daqp_sample=n_daqp,
                               speedup_vs_reference=t_ref / t_proj, speedup_vs_daqp=t_daqp / t_proj,
                               ratio_to_softmax=t_proj / t_soft,
                               backward_over_forward=t_bwd / med["forward_grad"],
                               kkt_residual_max=float(info.kkt_residual.max()),
                               iterations_mean=float(info.iterations.double().mean()),
                               iterations_max=int(info.iterations.max()), status=status, max_abs_diff=diff,
                               reference_sample=n)
                    results.append(row)
                    write_results(args.out, results, args.device, logits=args.logits,  # after every row: a long
                                  all_outside=args.all_outside, violated=args.violated)  # grid keeps what it measured
                    print(f"{family:>3} {K:>3} {N:>6} {name:>8} {infeasible:>5.2f} {t_proj*1e6:>10.3f} {t_soft*1e6:>10.4f} "
                          f"{t_daqp*1e6:>8.2f} {t_ref*1e6:>9.1f} {t_proj/t_soft:>9.1f} {t_daqp/t_proj:>7.2f} "
                          f"{t_ref/t_proj:>8.0f} {row['backward_over_forward']:>7.2f} {row['kkt_residual_max']:>8.1e} "
                          f"{diff:>9.2e}  {status}", flush=True)


def write_results(path: str, results: list[dict], device: str, **settings) -> None:
    """The benchmark JSON: threads, torch version, device name, the run's ``settings`` and its ``results``."""
    with open(path, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "device": _device_name(device),
                   **settings, "results": results}, f, indent=1)


def _device_name(device: str) -> str:
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
