"""Step benchmark: one token-level safekd step vs a plain uniform-weight KD step, side by side in one run.

Setting (issue 4): K=4 cached teachers, 8×128 tokens, vocabulary 1000, student = embedding + 2-layer
Transformer encoder of width 256 (+ LM head). The safekd step runs token-scale weights (ConfidenceSoftmax), a
per-token projection (cap + per-token unsafe_mass halfspace + safety order), the linear pool, forward KL, an
``unsafe_rate`` Lagrangian term and the dual update. The plain step does the same student forward/backward, a
uniform-weight linear pool of the same teachers, forward KL and the same optimizer step, written with torch only.
Steps alternate (plain, safekd, plain, ...) so machine load affects both alike; medians are compared.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_step.py [--steps 10] [--out benchmarks/results/bench_step.json]
[--device cuda]``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from safekd.spec import constraints as C  # noqa: E402
from safekd.training.distiller import SafeDistiller  # noqa: E402
from safekd.spec.document import ChecksSpec, DualSpec, Spec, TeacherSpec  # noqa: E402
from safekd.targets.weighting import ConfidenceSoftmax  # noqa: E402

K, B, T, V, WIDTH, LAYERS = 4, 8, 128, 1000, 256, 2


class SmallLM(nn.Module):
    """Embedding + positional embedding + 2-layer Transformer encoder (causal) + LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, WIDTH)
        self.pos = nn.Embedding(T, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, V)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos.weight[: x.shape[1]]
        return self.head(self.body(h, mask=self.causal, is_causal=True))


def plain_step(student: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    """Uniform-weight multi-teacher KD with torch only: q = (1/K) Σ_k p_k, loss = mean_t KL(q ‖ p_θ)."""
    opt.zero_grad(set_to_none=True)
    logits = student(batch["inputs"])
    with torch.no_grad():
        t_logp = torch.log_softmax(batch["teacher_logits"], dim=-1)
        target = torch.logsumexp(t_logp, dim=-2) - math.log(K)
    s_logp = torch.log_softmax(logits, dim=-1)
    loss = (target.exp() * (target - s_logp)).sum(-1).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--out", default="benchmarks/results/bench_step.json")
    ap.add_argument("--device", default="cpu", help="torch device (CUDA is synchronised around each timed step)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randint(0, V, (B, T), generator=g),
             "teacher_logits": 3 * torch.randn(B, T, K, V, generator=g),
             "labels": torch.randint(0, V, (B, T), generator=g)}
    batch = {k: t.to(device) for k, t in batch.items()}
    unsafe = list(range(0, V, 20))  # 50 unsafe token ids

    torch.manual_seed(0)
    s_plain = SmallLM().to(device)
    torch.manual_seed(0)
    s_safe = SmallLM().to(device)
    o_plain = torch.optim.AdamW(s_plain.parameters(), lr=1e-4)
    o_safe = torch.optim.AdamW(s_safe.parameters(), lr=1e-4)
    spec = Spec(teachers=[TeacherSpec(f"t{k}", safety=float(K - k)) for k in range(K)],
                constraints=[C.cap("t3", 0.3), C.unsafe_mass(0.06), C.safety_order(), C.unsafe_rate(0.03)],
                unsafe=unsafe, dual=DualSpec(rule="gradient_ascent", lr=0.05), checks=ChecksSpec())
    dist = SafeDistiller(s_safe, None, o_safe, spec, weighting=ConfidenceSoftmax(beta=2.0, validate_args=False))

    # Time spent inside the teacher-weight projection (safekd's share that runs solvers.project).
    proj_time = [0.0]
    inner = dist.pipeline._project

    def timed_project(*a):  # noqa: ANN002, ANN202
        sync()
        t = time.perf_counter()
        out = inner(*a)
        sync()
        proj_time[0] += time.perf_counter() - t
        return out

    dist.pipeline._project = timed_project
    times: dict[str, list[float]] = {"plain": [], "safekd": [], "projection": []}
    last = None
    for i in range(args.steps + 2):
        sync()
        t0 = time.perf_counter()
        plain_step(s_plain, o_plain, batch)
        sync()
        t1 = time.perf_counter()
        proj_time[0] = 0.0
        last = dist.step(batch)
        sync()
        t2 = time.perf_counter()
        if i >= 2:
            times["plain"].append(t1 - t0)
            times["safekd"].append(t2 - t1)
            times["projection"].append(proj_time[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["safekd"] / med["plain"]
    ratio_wo_proj = statistics.median(s - p for s, p in zip(times["safekd"], times["projection"])) / med["plain"]
    result = {
        "setting": {"K": K, "batch": B, "seq": T, "vocab": V, "width": WIDTH, "layers": LAYERS,
                    "student_params": sum(p.numel() for p in s_safe.parameters()), "threads": torch.get_num_threads(),
                    "steps": args.steps, "torch": torch.__version__, "machine": platform.machine(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "median_s": med, "all_s": times, "ratio": ratio, "ratio_excluding_projection": ratio_wo_proj,
        "safekd_last_step": {"tokens": last.projection["tokens"],
                             "projected_tokens": last.projection["projected_tokens"],
                             "relaxed_tokens": last.projection["relaxed_tokens"],
                             "active": last.projection["active"], "unsafe_rate": last.constraints["unsafe_rate"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"plain KD step  : {med['plain'] * 1e3:8.1f} ms (median of {args.steps})")
    print(f"safekd step    : {med['safekd'] * 1e3:8.1f} ms")
    print(f"  of which projection: {med['projection'] * 1e3:8.1f} ms "
          f"({last.projection['projected_tokens']}/{last.projection['tokens']} tokens sent to solvers.project)")
    print(f"ratio          : {ratio:.3f}  (target <= 1.10); without the projection: {ratio_wo_proj:.3f}  -> {out}")


if __name__ == "__main__":
    main()
