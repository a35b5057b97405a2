"""The chunked LM head's custom autograd Function vs ``torch.utils.checkpoint`` per chunk vs full logits.

The reductions the sparse path reads from a ``StudentHidden`` student (z on a 256-id support, logsumexp over V and
over an 865-id unsafe set), forward and backward, for N = 1,024 tokens, H = 64, V = 32,000 and 131-token chunks:
working set (peak resident memory minus resident memory before; glibc returns freed blocks) and time of one call,
one thread. Usage: ``python benchmarks/bench_head.py``.
"""
import os
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed tensors go back to the OS: RSS follows live memory
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from safekd.targets.head import StudentHidden, head_reductions  # noqa: E402

torch.set_num_threads(1)


def st(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


N, H, V, M, c = 1024, 64, 32000, 256, 131
g = torch.Generator().manual_seed(0)
h0 = torch.randn(N, H, generator=g)
W = torch.randn(V, H, generator=g).mul_(0.1).requires_grad_()
b = torch.zeros(V, requires_grad=True)
gather = torch.randint(0, V, (N, M), generator=g)
ids = torch.arange(7, V, 37)


def chunk_fn(hc: torch.Tensor, gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's reductions through autograd: z on the support, logsumexp over V and over the set."""
    z = F.linear(hc, W, b)
    return z.gather(1, gc), torch.logsumexp(z, -1, keepdim=True), torch.logsumexp(z[:, ids], -1, keepdim=True)


def ckpt() -> None:
    """The reductions with each chunk checkpointed (its logits recomputed in backward by autograd)."""
    h = h0.clone().requires_grad_()
    outs = [checkpoint(chunk_fn, h[s:s + c], gather[s:s + c], use_reentrant=False) for s in range(0, N, c)]
    zg, lse, lu = (torch.cat(x) for x in zip(*outs))
    ((zg - lse).sum() + (lu - lse).exp().sum()).backward()


def custom() -> None:
    """The reductions through safekd.head (custom autograd Function, two reused [chunk, V] buffers)."""
    h = h0.clone().requires_grad_()
    r = head_reductions(StudentHidden(h, W, b, chunk_size=c), gather, (1.0,), [(0, ids, None)])
    lse = r.lse[:, :1]
    ((r.gathered - lse).sum() + (r.set_lse - lse).exp().sum()).backward()


def full() -> None:
    """The reductions on the full [N, V] logits."""
    h = h0.clone().requires_grad_()
    zg, lse, lu = chunk_fn(h, gather)
    ((zg - lse).sum() + (lu - lse).exp().sum()).backward()


for name, f in (("custom Function", custom), ("checkpoint per chunk", ckpt), ("full logits", full)):
    f()
    W.grad = b.grad = None
    before = st("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak resident size to the current one
        fh.write("5")
    t0 = time.perf_counter()
    f()
    dt = time.perf_counter() - t0
    print(f"{name:22s} working set {(st('VmHWM') - before) / 2**20:7.1f} MiB  {dt * 1e3:6.0f} ms")
    W.grad = b.grad = None
