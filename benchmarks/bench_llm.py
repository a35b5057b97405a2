"""LLM-scale step benchmark: sparse top-k teacher caches vs dense teacher logits, side by side in one run.

Setting (``--quick``): vocabulary V = 32,000, K = 4 cached teachers (one of them shifted towards the unsafe set),
16×64 tokens, top-k = 64, a small LM student (embedding → tanh layer → LM head, width 64). Every path runs the same
``SafeDistiller.step`` (confidence weights, ``cap`` + per-token ``unsafe_mass`` projection, linear pool, forward
KL, AdamW): the dense path reads ``teacher_logits [B, T, K, V]`` (float32) and a student returning logits; the
sparse path the cache ``safekd.sparse.topk_logprobs`` writes (top-k ids and log-probs, exact float64 p_k(U)) and a
student returning its hidden states and LM head (``safekd.StudentHidden``: the ``[B, T, V]`` logits and their
gradient are never materialised, the head is read in chunks of tokens); the sparse path with a student returning
full logits is measured too (the extra ``sparse, full student logits`` line). Steps alternate (dense, sparse, sparse
with full logits, ...); medians are compared.

Measured:
* peak memory per path = the batch's bytes + the step's working set (peak resident memory during the step minus
  resident memory before it; glibc is told to return freed blocks, so the resident size follows the tensors);
* step time (median);
* KL(dense-pooled target ‖ sparse-pooled target), mean over tokens (the sparse target read as its uniform-tail
  distribution over V);
* the unsafe-mass constraint on the dense distribution: max_t (Σ_k w_tk p_k(U | t) − ε)_+ with the sparse path's
  weights and p_k(U) from the full logits in float64.

Usage: ``python benchmarks/bench_llm.py --quick [--out benchmarks/results/bench_llm.json]`` (one thread).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed tensors go back to the OS: RSS follows live memory
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from safekd.spec import constraints as C  # noqa: E402
from safekd.training.distiller import SafeDistiller  # noqa: E402
from safekd.targets.head import StudentHidden  # noqa: E402
from safekd.targets.sparse import topk_logprobs  # noqa: E402
from safekd.spec.document import ChecksSpec, DualSpec, Spec, TeacherSpec  # noqa: E402
from safekd.spec.unsafe import UnsafeSet  # noqa: E402
from safekd.targets.weighting import ConfidenceSoftmax  # noqa: E402

EPS = 0.05


class TinyLM(nn.Module):
    """Embedding → tanh layer → LM head; ``hidden=True`` returns the hidden states and the head instead of logits."""

    def __init__(self, V: int, width: int, hidden: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.emb = nn.Embedding(V, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor | StudentHidden:
        h = torch.tanh(self.mid(self.emb(x)))
        return StudentHidden.of(h, self.head) if self.hidden else self.head(h)


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident size (VmHWM) to the current one
        f.write("5")


def _nbytes(batch: dict) -> int:
    return sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="V=32000, K=4, 16x64 tokens, k=64, 3 timed steps per path")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64, help="top-k kept per token and teacher")
    ap.add_argument("--out", default="benchmarks/results/bench_llm.json")
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    torch.set_num_threads(1)
    K, B, T, V, k, width = 4, 16, 64, args.vocab, args.k, 64
    g = torch.Generator().manual_seed(0)
    unsafe = UnsafeSet(torch.arange(7, V, 37))  # ~865 unsafe ids, the size of a profanity word list
    # LM-like teachers: a shared component (they agree) plus their own; teachers 0-2 avoid U, teacher 3 leans to it
    logits = 3.6 * torch.randn(B, T, 1, V, generator=g) + 2.0 * torch.randn(B, T, K, V, generator=g)
    logits[:, :, :3, unsafe.ids] -= 3.0
    logits[:, :, 3, unsafe.ids] += 4.0
    base = {"inputs": torch.randint(0, V, (B, T), generator=g), "labels": torch.randint(0, V, (B, T), generator=g)}
    dense = {**base, "teacher_logits": logits}
    sparse = {**base, **topk_logprobs(logits, k, unsafe)}
    coverage = float(sparse["teacher_topk_logprobs"].exp().sum(-1).mean())

    spec = Spec(teachers=[TeacherSpec(f"t{i}", safety=float(K - i)) for i in range(K)],
                constraints=[C.cap("t3", 0.5), C.unsafe_mass(EPS)], unsafe=unsafe,
                dual=DualSpec(rule="gradient_ascent", lr=0.05), checks=ChecksSpec(reference_every=0))

    def distiller(hidden: bool = False) -> SafeDistiller:
        torch.manual_seed(0)
        student = TinyLM(V, width, hidden)
        return SafeDistiller(student, None, torch.optim.AdamW(student.parameters(), lr=1e-3), spec,
                             weighting=ConfidenceSoftmax(beta=2.0, validate_args=False))

    paths = {"dense": (distiller(), dense), "sparse": (distiller(hidden=True), sparse),
             "sparse_full_logits": (distiller(), sparse)}
    times: dict[str, list[float]] = {n: [] for n in paths}
    work: dict[str, int] = {n: 0 for n in paths}
    for i in range(steps + 1):
        for name, (d, batch) in paths.items():
            before = _status("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            d.step(batch)
            dt = time.perf_counter() - t0
            work[name] = max(work[name], _status("VmHWM") - before)
            if i >= 1:
                times[name].append(dt)
    med = {n: statistics.median(v) for n, v in times.items()}
    peak = {n: work[n] + _nbytes(paths[n][1]) for n in paths}

    # pooled targets of both paths at the same (fresh) student, and the unsafe rows on the full distribution
    fresh = distiller()
    with torch.no_grad():
        student_logits = fresh.student(base["inputs"])
        pipe = fresh.pipeline
        td = pipe(dense, student_logits, pipe.teacher_logits(dense))
        ts = pipe(sparse, student_logits, pipe.teacher_logits(sparse), expand=False)
        q_sparse = ts.sparse.buckets.expand(ts.sparse.target_logp).float()
        q_dense = td.target_logp
        kl = float((q_dense.exp() * (q_dense - q_sparse)).sum(-1).mean())
        p_u = unsafe.mass(torch.log_softmax(logits.double(), dim=-1), teacher_axis=True)
        violation = float(((ts.weights.double() * p_u).sum(-1) - EPS).clamp_min(0).max())
        violation_dense_path = float(((td.weights.double() * p_u).sum(-1) - EPS).clamp_min(0).max())
        active, relaxed = int(ts.projection["projected_tokens"]), int(ts.projection["relaxed_tokens"])

    x, y = peak["sparse"] / peak["dense"], med["sparse"] / med["dense"]
    x_full, y_full = peak["sparse_full_logits"] / peak["dense"], med["sparse_full_logits"] / med["dense"]
    floor = 2 * B * T * V * 4  # the student's float32 logits and their gradient: held by the paths reading logits
    x_teacher = (peak["sparse_full_logits"] - floor) / (peak["dense"] - floor)
    sparse_d = paths["sparse"][0]
    chunk = sparse_d.student(base["inputs"][:1, :1]).chunk
    result = {
        "setting": {"K": K, "batch": B, "seq": T, "vocab": V, "k": k, "student_width": width,
                    "sparse_student": f"StudentHidden (hidden states + LM head), {chunk} tokens per chunk",
                    "unsafe_ids": int(unsafe.ids.numel()), "top_k_mass_mean": coverage, "epsilon": EPS,
                    "threads": torch.get_num_threads(), "steps": steps, "torch": torch.__version__,
                    "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), one thread"},
        "peak_memory_bytes": peak, "batch_bytes": {n: _nbytes(b) for n, (_, b) in paths.items()},
        "step_working_set_bytes": work, "step_time_s": {"median": med, "all": times},
        "sparse_over_dense_peak_memory": x, "sparse_over_dense_step_time": y,
        "sparse_full_logits_over_dense_peak_memory": x_full, "sparse_full_logits_over_dense_step_time": y_full,
        "student_logits_and_grad_bytes": floor,
        "sparse_full_logits_over_dense_peak_memory_beyond_student_logits": x_teacher,
        "pooled_target_kl_dense_sparse": kl,
        "unsafe_mass_max_violation_on_dense": {"sparse_path": violation, "dense_path": violation_dense_path},
        "tokens_projected": active, "tokens_relaxed": relaxed,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    mb = 1 / 2**20
    print(f"V={V} K={K} tokens={B}x{T} k={k} (top-k holds {coverage:.1%} of each teacher's mass on average)")
    print(f"dense : peak {peak['dense'] * mb:8.1f} MiB (batch {_nbytes(dense) * mb:.1f}), "
          f"step {med['dense'] * 1e3:8.1f} ms")
    print(f"sparse: peak {peak['sparse'] * mb:8.1f} MiB (batch {_nbytes(sparse) * mb:.1f}), "
          f"step {med['sparse'] * 1e3:8.1f} ms  (student hidden states + LM head, {chunk} tokens per chunk)")
    print(f"sparse/dense peak memory = {x:.3f}")
    print(f"sparse/dense step time = {y:.3f}")
    print(f"sparse, full student logits: peak {peak['sparse_full_logits'] * mb:.1f} MiB, step "
          f"{med['sparse_full_logits'] * 1e3:.1f} ms: /dense peak memory {x_full:.3f} (beyond the student's logits "
          f"and their gradient, {floor * mb:.0f} MiB: {x_teacher:.3f}), step time {y_full:.3f}")
    print(f"pooled-target KL(dense||sparse) = {kl:.4g} nats/token")
    print(f"unsafe-mass max violation on the dense distribution = {violation:.3g} (sparse path; dense path "
          f"{violation_dense_path:.3g}; {active} tokens projected, {relaxed} relaxed)  -> {out}")


if __name__ == "__main__":
    main()
