"""A student given as hidden states and its LM head: the per-token reductions of the sparse path, chunk by chunk.

With sparse (top-k) teachers the step never needs the student's full logits z = h Wᵀ + b ``[N, V]``, only a few
numbers per token (see :mod:`safekd.sparse`): z gathered on the union support S (and at labels), the log-normaliser
logsumexp_v z_v/τ, logsumexps z/τ over id sets (U ∖ S for the tail bucket T_U, U for ``unsafe_rate``) and, for
``retain``, argmax_v z_v. :class:`StudentHidden` carries ``hidden [..., H]`` and the head (``weight [V, H]``,
optional ``bias [V]``); :func:`head_reductions` computes those reductions over chunks of ``chunk_size`` tokens, and
its backward recomputes each chunk's logits and accumulates

    ∂ℒ/∂z_c = Σ_τ (g_lse_τ / τ)·softmax(z_c/τ) + scatter(g_gather) + Σ_sets (g_set / τ)·softmax_set(z_c/τ),
    ∂ℒ/∂h_c = (∂ℒ/∂z_c) W,   ∂ℒ/∂W += (∂ℒ/∂z_c)ᵀ h_c,   ∂ℒ/∂b += Σ_rows ∂ℒ/∂z_c,

so the largest live tensors are a few ``[chunk_size, V]`` buffers instead of the logits and their gradient (the
fused linear cross-entropy of Liger Kernel and the chunked LM-head losses of torchtune and DistillKit). The cost:
one more ``h Wᵀ`` product per step (the backward's recomputation: Liger writes the gradient during the forward
pass, which needs ∂ℒ/∂(reductions) there; here the divergence, the constraints and the multipliers use the
reductions after the pass). ``torch.utils.checkpoint`` per chunk does the
same recomputation through autograd with more live buffers: for these reductions at N = 1,024 tokens, H = 64,
V = 32,000 and 131-token chunks, forward and backward took a 42 MiB working set here against 90 MiB checkpointed
(626 MiB on full logits), in 0.37–0.46 of the checkpointed time over three runs (``benchmarks/bench_head.py``;
a shared 2-core x86-64 CPU, one thread).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StudentHidden", "HeadReductions", "head_reductions", "CHUNK_ELEMENTS"]

#: default chunk: about this many logits (``chunk_size · V``) per chunk, i.e. 16 MiB of float32
CHUNK_ELEMENTS = 1 << 22
#: log-mass given to excluded set members and to empty buckets (:mod:`safekd.sparse`: repeated ids, an empty tail):
#: exp underflows to exactly 0 in every float type, and, unlike −inf, it keeps −inf − (−inf) = NaN out of gradients
_EMPTY = -1e4


@dataclass(frozen=True, eq=False)
class StudentHidden:
    """A student's output as final hidden states and its LM head, instead of logits: the logits would be
    z = hidden @ weightᵀ + bias ``[..., V]``. Return it from the student's ``forward`` (e.g.
    ``StudentHidden.of(model.model(ids).last_hidden_state, model.lm_head)``) and :class:`~safekd.SafeDistiller`
    trains on sparse teacher caches without materialising ``[..., V]`` logits or their gradient (dense teachers and
    :meth:`~safekd.SafeDistiller.targets` compute :meth:`logits`).

    Args:
        hidden: ``[..., H]`` floating point (the token shape is ``hidden.shape[:-1]``).
        weight: the head's ``[V, H]`` weight (a parameter of the student: it receives its gradient).
        bias: optional ``[V]``.
        chunk_size: tokens per chunk (default: about 2²² logits per chunk, ``max(1, 2**22 // V)`` tokens).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        h, w, b = self.hidden, self.weight, self.bias
        if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() < 1:
            raise TypeError(f"StudentHidden: hidden must be a floating-point tensor [..., H], got "
                            f"{type(h).__name__ if not isinstance(h, Tensor) else (h.dtype, tuple(h.shape))}")
        if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != h.shape[-1] or not w.is_floating_point():
            raise ValueError(f"StudentHidden: weight must be a floating-point [V, H={h.shape[-1]}] tensor, got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if b is not None and (not isinstance(b, Tensor) or b.shape != (w.shape[0],)):
            raise ValueError(f"StudentHidden: bias must be a [V={w.shape[0]}] tensor or None, got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        if w.device != h.device or (b is not None and b.device != h.device):
            raise ValueError(f"StudentHidden: hidden ({h.device}), weight ({w.device}) and bias must share a device")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"StudentHidden: chunk_size must be a positive int or None, got {self.chunk_size!r}")

    @classmethod
    def of(cls, hidden: Tensor, head: nn.Module, chunk_size: int | None = None) -> "StudentHidden":
        """From an ``nn.Linear``-like head (``head.weight [V, H]``, ``head.bias`` or None)."""
        if not isinstance(getattr(head, "weight", None), Tensor):
            raise TypeError(f"StudentHidden.of: the head must have a .weight tensor [V, H] (an nn.Linear), got "
                            f"{type(head).__name__}")
        return cls(hidden, head.weight, getattr(head, "bias", None), chunk_size)

    @property
    def vocab_size(self) -> int:
        """V, the head's output size."""
        return int(self.weight.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The logits' shape ``[..., V]`` (nothing is computed)."""
        return torch.Size((*self.hidden.shape[:-1], self.vocab_size))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        """The reductions' dtype: the logits' dtype, at least float32."""
        return torch.promote_types(torch.promote_types(self.hidden.dtype, self.weight.dtype), torch.float32)

    @property
    def chunk(self) -> int:
        """Tokens per chunk in force."""
        return self.chunk_size if self.chunk_size is not None else max(1, CHUNK_ELEMENTS // self.vocab_size)

    def logits(self) -> Tensor:
        """The full logits ``[..., V]`` = hidden @ weightᵀ + bias (differentiable; what the chunked path avoids)."""
        return F.linear(self.hidden, self.weight, self.bias)

    def detach(self) -> "StudentHidden":
        return StudentHidden(self.hidden.detach(), self.weight.detach(),
                             None if self.bias is None else self.bias.detach(), self.chunk_size)


@dataclass(frozen=True, eq=False)
class HeadReductions:
    """The outputs of :func:`head_reductions` over the flattened tokens ``[N]``: ``gathered [N, m]`` (z at the
    gathered ids), ``lse [N, len(temperatures)]`` (logsumexp_v z_v/τ), ``set_lse [N, len(sets)]``
    (logsumexp over each set of z/τ, excluded members left out) and ``argmax [N]`` (or None)."""

    gathered: Tensor
    lse: Tensor
    set_lse: Tensor
    argmax: Tensor | None


def head_reductions(student: StudentHidden, gather: Tensor, temperatures: Sequence[float] = (1.0,),
                    sets: Sequence[tuple[int, Tensor, Tensor | None]] = (), argmax: bool = False) -> HeadReductions:
    """Per-token reductions of the logits z = h Wᵀ + b, chunk by chunk over the N = ∏ token-shape tokens, with the
    chunk's logits recomputed in backward (see the module docstring).

    Args:
        student: the hidden states and head.
        gather: ``[N, m]`` ids in ``[0, V)``: ``gathered = z.gather(-1, gather)``.
        temperatures: τ_i of ``lse[:, i] = logsumexp_v z_v/τ_i``.
        sets: ``(i, ids [u], exclude [N, u] bool or None)``: ``set_lse[:, j] = logsumexp_{v∈ids, not excluded}
            z_v/τ_i`` (a fully excluded row gives about −1e4, never −inf: no NaN in gradients).
        argmax: also return argmax_v z_v ``[N]`` (no gradient).
    """
    h = student.hidden.reshape(-1, student.hidden.shape[-1])
    if gather.dim() != 2 or gather.shape[0] != h.shape[0]:
        raise ValueError(f"gather must be [N={h.shape[0]}, m], got {tuple(gather.shape)}")
    spec = (tuple(float(t) for t in temperatures), tuple((int(i), ids, ex) for i, ids, ex in sets), bool(argmax),
            student.chunk, student.dtype)
    gathered, lse, set_lse, amax = _HeadReduce.apply(h, student.weight, student.bias, gather, spec)
    return HeadReductions(gathered, lse, set_lse, amax if argmax else None)


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """z = h Wᵀ + b written into the preallocated ``out [n, V]`` (one buffer reused by every chunk)."""
    if h.dtype == weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        return torch.mm(h, weight.t(), out=out) if bias is None else torch.addmm(bias, h, weight.t(), out=out)
    return out.copy_(F.linear(h, weight, bias))


def _lse(z: Tensor, t: float, work: Tensor) -> Tensor:
    """logsumexp_v z_v/τ ``[n]`` with ``work [n, V]`` as scratch (no allocation of an [n, V] temporary)."""
    m = z.amax(-1, keepdim=True)
    if t != 1.0:
        m = m / t
        torch.div(z, t, out=work).sub_(m)
    else:
        torch.sub(z, m, out=work)
    return m.squeeze(-1) + work.exp_().sum(-1).log()


class _HeadReduce(torch.autograd.Function):
    """(h ``[N, H]``, W ``[V, H]``, b) → (z gathered ``[N, m]``, lse ``[N, T]``, set lse ``[N, S]``, argmax ``[N]``),
    chunk by chunk in two reused ``[chunk, V]`` buffers; backward recomputes each chunk's logits (see the module
    docstring)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, gather: Tensor, spec: tuple
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        temps, sets, want_argmax, chunk, dtype = spec
        N, V = h.shape[0], weight.shape[0]
        gathered = torch.empty(N, gather.shape[1], dtype=dtype, device=h.device)
        lse = torch.empty(N, len(temps), dtype=dtype, device=h.device)
        set_lse = torch.empty(N, len(sets), dtype=dtype, device=h.device)
        amax = torch.zeros(N if want_argmax else 0, dtype=torch.long, device=h.device)
        z_buf = torch.empty(min(chunk, N), V, dtype=dtype, device=h.device)
        work = torch.empty_like(z_buf)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = _logits_into(z_buf[:e - s], h[s:e], weight, bias)
            gathered[s:e] = z.gather(1, gather[s:e])
            for i, t in enumerate(temps):
                lse[s:e, i] = _lse(z, t, work[:e - s])
            for j, (i, ids, exclude) in enumerate(sets):
                set_lse[s:e, j] = torch.logsumexp(_set_logits(z, ids, exclude, s, e, temps[i]), dim=-1)
            if want_argmax:
                amax[s:e] = z.argmax(-1)
        ctx.spec = spec
        ctx.save_for_backward(h, weight, bias, gather, lse, set_lse)
        ctx.mark_non_differentiable(amax)
        return gathered, lse, set_lse, amax

    @staticmethod
    def backward(ctx: Any, g_gathered: Tensor, g_lse: Tensor, g_set: Tensor, _g_amax: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        h, weight, bias, gather, lse, set_lse = ctx.saved_tensors
        temps, sets, _, chunk, dtype = ctx.spec
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = h.shape[0], weight.shape[0]
        g_h = torch.empty_like(h) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        g_b = torch.zeros(V, dtype=dtype, device=weight.device) if need_b and bias is not None else None
        z_buf = torch.empty(min(chunk, N), V, dtype=dtype, device=h.device)
        g_buf, work = torch.empty_like(z_buf), torch.empty_like(z_buf) if len(temps) > 1 else None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = _logits_into(z_buf[:e - s], h[s:e], weight, bias)
            g_z = g_buf[:e - s]
            for i, t in enumerate(temps):  # (g_i / τ_i) · softmax(z / τ_i)
                out = g_z if i == 0 else work[:e - s]  # type: ignore[index]
                (torch.sub(z, lse[s:e, i:i + 1], out=out) if t == 1.0 else
                 torch.div(z, t, out=out).sub_(lse[s:e, i:i + 1]))
                out.exp_().mul_(g_lse[s:e, i:i + 1] / t)
                if i:
                    g_z.add_(out)
            g_z.scatter_add_(1, gather[s:e], g_gathered[s:e].to(dtype))
            for j, (i, ids, exclude) in enumerate(sets):
                zu = _set_logits(z, ids, exclude, s, e, temps[i])
                g_z.index_add_(1, ids, zu.sub_(set_lse[s:e, j:j + 1]).exp_().mul_(g_set[s:e, j:j + 1] / temps[i]))
            g_zc = g_z.to(weight.dtype)
            if g_h is not None:
                if h.dtype == weight.dtype:
                    torch.mm(g_zc, weight, out=g_h[s:e])
                else:
                    g_h[s:e] = (g_zc @ weight).to(h.dtype)
            if g_w is not None:
                g_w.addmm_(g_z.t(), h[s:e].to(dtype))
            if g_b is not None:
                g_b.add_(g_z.sum(0))
        return (g_h, None if g_w is None else g_w.to(weight.dtype),
                None if g_b is None else g_b.to(bias.dtype), None, None)


def _set_logits(z: Tensor, ids: Tensor, exclude: Tensor | None, s: int, e: int, t: float) -> Tensor:
    """z/τ on a set's ids for rows s:e, excluded members set to −1e4 (a fresh tensor)."""
    zu = z.index_select(1, ids)
    if t != 1.0:
        zu.div_(t)
    if exclude is not None:
        zu.masked_fill_(exclude[s:e], _EMPTY)
    return zu
