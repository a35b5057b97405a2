"""Sparse (top-k) teacher distributions: pooling, divergences and exact unsafe mass without ``[..., K, V]`` tensors.

A sparse teacher is, per token, its top-k ids and log-probabilities (under the full softmax) plus its exact unsafe
mass ``p_k(U)`` computed from the full logits when it was cached (batch keys ``teacher_topk_ids``,
``teacher_topk_logprobs``, ``teacher_unsafe_mass``; see ``docs/architecture.md``).

**Estimator (uniform tail).** Teacher k is read as the full distribution p̂_k that is exact on its top-k and
spreads the rest uniformly, separately inside and outside U::

    p̂_k(v) = p_k(v)                       v ∈ top_k
    p̂_k(v) = (p_k(U) − p_k(U ∩ top_k)) / |U ∖ top_k|         v ∈ U ∖ top_k
    p̂_k(v) = (1 − p_k(U) − p_k(top_k ∖ U)) / |(V∖U) ∖ top_k|  otherwise

so p̂_k(U) = p_k(U) exactly, and p̂_k = p_k when k = V. Pools and divergences run on the buckets
S = ∪_k top_k (one bucket per token, ``M = K·k`` slots; repeated ids are empty slots) plus two tail buckets
T_U = U ∖ S and T_S = (V ∖ U) ∖ S: ``[..., K, M + 2]`` instead of ``[..., K, V]``. Every pool that is
1-homogeneous in the teacher probabilities (linear, geometric, power-mean) commutes with this bucketing, so the
pooled buckets are exactly the buckets of the pool of the p̂_k; the linear pool's unsafe mass is exactly
Σ_k w_k p_k(U), which is what the ``unsafe_mass`` rows constrain and the target correction enforces.
The student is read on the same buckets: log p_θ(v) = z_v − logsumexp(z) gathered on S, its mass on T_U from
its logits on U, and T_S = the rest. A divergence on the buckets is the divergence between the two
distributions coarsened to the buckets: equal to the full one when k = V, a lower bound otherwise (forward and
reverse KL, JSD and TVD are f-divergences: data processing). Weighting operators read the teachers' bucket
distributions, and the gold token's log p̂_k(y) (exact where y is in teacher k's top-k) as ``sampled_logprobs``. The divergence temperature softens per token (a tail bucket's tokens share one
value); per-teacher temperatures need dense logits (a cache holds temperature-1 log-probabilities). Top-k
probabilities stored with rounding (bf16) are shrunk, where they exceed them, to the exact budgets p_k(U) and
1 − p_k(U), so p̂_k(U) = p_k(U) and Σ p̂_k = 1 hold exactly whatever the storage precision.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from safekd.spec import constraints as C
from safekd.targets.head import _EMPTY, StudentHidden, head_reductions  # _EMPTY: log-mass of empty buckets
from safekd.targets.pooling import log1mexp
from safekd.spec.unsafe import UnsafeSet, cap_unsafe_mass

__all__ = ["SparseTeachers", "SparseTargets", "SparseContext", "Buckets", "topk_logprobs", "sparse_divergence",
           "correct_unsafe", "token_rows", "distiller_targets", "SPARSE_KEYS", "StudentHidden", "hidden_pass",
           "HiddenStats", "check_hidden_student"]

logger = logging.getLogger(__name__)

#: Batch keys of a sparse teacher cache (the unsafe mass is optional without unsafe constraints).
SPARSE_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_unsafe_mass")
_NEG_INF = -math.inf


def topk_logprobs(logits: Tensor, k: int, unsafe: UnsafeSet | None = None,
                  batch: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """The sparse cache of full logits ``[..., K, V]`` (or ``[..., V]``): ``teacher_topk_ids [..., K, k]``,
    ``teacher_topk_logprobs [..., K, k]`` (log-softmax over all V, at least float32) and, with ``unsafe``, the exact
    ``teacher_unsafe_mass [..., K]`` = Σ_{v∈U} softmax(z)_v, computed and kept in float64 (8 bytes per token and
    teacher, so that the unsafe rows hold to 1e-12 on the full distribution)."""
    V = logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must lie in [1, V={V}], got {k}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    top, ids = z.topk(k, dim=-1)
    out = {"teacher_topk_ids": ids, "teacher_topk_logprobs": top - lse}
    if unsafe is not None:
        out["teacher_unsafe_mass"] = unsafe.mass_from_logits(z.double(), None, batch)
    return out


@dataclass(frozen=True, eq=False)
class SparseTeachers:
    """Top-k teacher distributions: ``ids [..., K, k]`` (long), ``logprobs [..., K, k]`` (log-probabilities
    under each teacher's full softmax), ``unsafe_mass [..., K]`` (exact p_k(U), or None)."""

    ids: Tensor
    logprobs: Tensor
    unsafe_mass: Tensor | None = None

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], K: int) -> "SparseTeachers":
        """Read and validate the sparse keys of ``batch`` (K = number of teachers).

        Raises:
            ValueError: a key is missing or has the wrong shape, dtype or values (the message names the key).
        """
        for key in SPARSE_KEYS[:2]:
            if batch.get(key) is None:
                raise ValueError(f"a sparse teacher batch needs {SPARSE_KEYS[:2]}; batch[{key!r}] is missing")
        ids, lp = torch.as_tensor(batch["teacher_topk_ids"]), torch.as_tensor(batch["teacher_topk_logprobs"])
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"batch['teacher_topk_ids'] must be an integer tensor, got {ids.dtype}")
        if ids.dim() < 2 or ids.shape[-2] != K:
            raise ValueError(f"batch['teacher_topk_ids'] must be [..., K={K}, k], got {tuple(ids.shape)}")
        if lp.shape != ids.shape or not lp.is_floating_point():
            raise ValueError(f"batch['teacher_topk_logprobs'] must be a float tensor of the ids' shape "
                             f"{tuple(ids.shape)}, got {lp.dtype} {tuple(lp.shape)}")
        lp32 = lp.to(torch.promote_types(lp.dtype, torch.float32))
        if bool(torch.isnan(lp32).any()) or bool((lp32 > 1e-4).any()):
            raise ValueError("batch['teacher_topk_logprobs'] must be log-probabilities (<= 0, no NaN)")
        if bool((ids < 0).any()):
            raise ValueError(f"batch['teacher_topk_ids'] has negative ids (min {int(ids.min())})")
        mass = batch.get("teacher_unsafe_mass")
        if mass is not None:
            mass = torch.as_tensor(mass)
            if mass.shape != ids.shape[:-1] or not mass.is_floating_point():
                raise ValueError(f"batch['teacher_unsafe_mass'] must be a float tensor of shape "
                                 f"{tuple(ids.shape[:-1])}, got {mass.dtype} {tuple(mass.shape)}")
            if not bool(((mass >= 0) & (mass <= 1 + 1e-4)).all()):
                raise ValueError("batch['teacher_unsafe_mass'] must lie in [0, 1]")
        return cls(ids.long(), lp32, mass)

    def buckets(self, vocab_size: int, unsafe: UnsafeSet | None, dtype: torch.dtype | None = None) -> "Buckets":
        """The teachers on the union support plus the two tail buckets (see the module docstring)."""
        if int(self.ids.max()) >= vocab_size:
            raise ValueError(f"batch['teacher_topk_ids'] has id {int(self.ids.max())}, out of range for the "
                             f"student's vocabulary of {vocab_size}")
        dtype = dtype or self.logprobs.dtype
        lp = self.logprobs.to(dtype)
        lead, K, k = self.ids.shape[:-2], self.ids.shape[-2], self.ids.shape[-1]
        ids_sorted, order = self.ids.sort(dim=-1)
        lp_sorted = lp.gather(-1, order)
        support, _ = ids_sorted.flatten(-2).sort(dim=-1)                           # [..., M], M = K·k
        valid = torch.ones_like(support, dtype=torch.bool)
        valid[..., 1:] = support[..., 1:] != support[..., :-1]
        u_ids = _unsafe_ids(unsafe, vocab_size, self.ids.device)
        n_u = 0 if u_ids is None else int(u_ids.numel())
        if u_ids is not None:
            if self.unsafe_mass is None:
                raise ValueError("sparse teachers with an unsafe set need batch['teacher_unsafe_mass'] (the exact "
                                 "p_k(U) from the full logits); re-create the cache with the unsafe set")
            top_in_u = torch.isin(ids_sorted, u_ids)
            s_in_u = torch.isin(support, u_ids)
            p_u = self.unsafe_mass.to(dtype)
        else:
            top_in_u = torch.zeros_like(ids_sorted, dtype=torch.bool)
            s_in_u = torch.zeros_like(support, dtype=torch.bool)
            p_u = lp.new_zeros(lead + (K,))
        # rounded (e.g. bf16) top-k probabilities may exceed their exact budgets p_k(U) and 1 − p_k(U): shrink them
        # so that p̂_k(U) = p_k(U) and Σ p̂_k = 1 hold exactly
        p_top = lp_sorted.exp()
        top_u, top_s = (p_top * top_in_u).sum(-1), (p_top * ~top_in_u).sum(-1)
        f_u = torch.where(top_u > p_u, p_u / top_u.clamp_min(torch.finfo(dtype).tiny), 1.0)
        f_s = torch.where(top_s > 1 - p_u, (1 - p_u) / top_s.clamp_min(torch.finfo(dtype).tiny), 1.0)
        lp_sorted = lp_sorted + torch.where(top_in_u, f_u.unsqueeze(-1), f_s.unsqueeze(-1)).log()
        tail_u = (p_u - f_u * top_u).clamp_min(0)
        tail_s = (1 - p_u - f_s * top_s).clamp_min(0)
        n_tail_u = n_u - top_in_u.sum(-1)                                            # |U ∖ top_k|
        n_tail_s = (vocab_size - n_u) - (~top_in_u).sum(-1)                          # |(V∖U) ∖ top_k|
        log_v_u = _log_ratio(tail_u, n_tail_u)                                       # per-token tail values
        log_v_s = _log_ratio(tail_s, n_tail_s)
        # teacher k on S: its own log-prob where v ∈ top_k, else its per-token tail value
        s_exp = support.unsqueeze(-2).expand(*lead, K, support.shape[-1]).contiguous()
        pos = torch.searchsorted(ids_sorted.contiguous(), s_exp).clamp_max(k - 1)
        hit = ids_sorted.gather(-1, pos) == s_exp
        fill = torch.where(s_in_u.unsqueeze(-2), log_v_u.unsqueeze(-1), log_v_s.unsqueeze(-1))
        on_s = torch.where(hit, lp_sorted.gather(-1, pos), fill).masked_fill(~valid.unsqueeze(-2), _NEG_INF)
        n_bucket_u = n_u - (s_in_u & valid).sum(-1)                                  # |T_U| = |U ∖ S|
        n_bucket_s = (vocab_size - n_u) - (~s_in_u & valid).sum(-1)                  # |T_S|
        log_count = torch.cat([torch.where(valid, 0.0, _NEG_INF).to(dtype),
                               _log_count(n_bucket_u, dtype).unsqueeze(-1),
                               _log_count(n_bucket_s, dtype).unsqueeze(-1)], dim=-1)
        teacher_logp = torch.cat([on_s, (log_v_u + _log_count(n_bucket_u, dtype).unsqueeze(-1)).unsqueeze(-1),
                                  (log_v_s + _log_count(n_bucket_s, dtype).unsqueeze(-1)).unsqueeze(-1)], dim=-1)
        in_u = torch.cat([s_in_u & valid, torch.ones_like(valid[..., :1]), torch.zeros_like(valid[..., :1])], -1)
        return Buckets(support=support, valid=valid, log_count=log_count, teacher_logp=teacher_logp, in_unsafe=in_u,
                       unsafe_ids=u_ids, vocab_size=vocab_size)


def _unsafe_ids(unsafe: UnsafeSet | None, vocab_size: int, device: torch.device) -> Tensor | None:
    if unsafe is None:
        return None
    if unsafe.ids is None:
        raise ValueError(f"sparse teachers need an unsafe set given by token ids; {unsafe!r} is a mask callable "
                         "(cache dense teacher logits, or list the unsafe ids)")
    unsafe._check_ids(vocab_size)  # sorted ids on the host: no device sync
    return unsafe.ids.to(device)


def _log_ratio(mass: Tensor, count: Tensor) -> Tensor:
    """log(mass / count), −inf where count = 0 or mass = 0."""
    return torch.where(count > 0, mass.log() - count.clamp_min(1).to(mass.dtype).log(), _NEG_INF)


def _log_count(n: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(n > 0, n.clamp_min(1).to(dtype).log(), _NEG_INF)


def _soften(logp: Tensor, log_count: Tensor, temperature: float) -> Tensor:
    """Per-token softening p(v)^{1/T} renormalised, on buckets: (log p_b − log c_b)/T + log c_b."""
    if temperature == 1.0:
        return logp
    per_token = torch.where(log_count > _NEG_INF, (logp - log_count) / temperature + log_count, _NEG_INF)
    return torch.log_softmax(per_token, dim=-1)


@dataclass(frozen=True, eq=False)
class Buckets:
    """Sparse teachers on the union support: ``support [..., M]`` (sorted ids; ``valid`` marks first occurrences),
    ``teacher_logp [..., K, M+2]`` (bucket log-masses; the last two are T_U and T_S), ``log_count [..., M+2]``
    (log of the tokens per bucket, −inf for empty ones), ``in_unsafe [..., M+2]`` (buckets inside U)."""

    support: Tensor
    valid: Tensor
    log_count: Tensor
    teacher_logp: Tensor
    in_unsafe: Tensor
    unsafe_ids: Tensor | None
    vocab_size: int

    def student_logp(self, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
        """The student's bucket log-masses ``[..., M+2]`` from its logits ``[..., V]`` (softened at T):
        z_v − logsumexp(z) on S, logsumexp over U ∖ S minus it for T_U, and log(1 − both) for T_S. The
        ``[..., V]`` work is one fused autograd node (:class:`_GatherLSE`): its backward writes the logits'
        gradient in one buffer. (A :class:`~safekd.head.StudentHidden` student goes through :func:`hidden_pass`.)"""
        z = student_logits if temperature == 1.0 else student_logits / temperature
        V = z.shape[-1]
        z_s, lse_u, lse = _GatherLSE.apply(z.reshape(-1, V), self.support.reshape(-1, self.support.shape[-1]),
                                           self.unsafe_ids, self.unsafe_in_support())
        return self.from_reductions(z_s, lse_u, lse)

    def unsafe_in_support(self) -> Tensor | None:
        """``[N, |U|]`` bool: which unsafe ids lie in each token's support S (None without an unsafe set)."""
        if self.unsafe_ids is None:
            return None
        lead = self.support.shape[:-1]
        u = self.unsafe_ids.expand(*lead, -1).contiguous()
        pos = torch.searchsorted(self.support.contiguous(), u).clamp_max(self.support.shape[-1] - 1)
        return (self.support.gather(-1, pos) == u).reshape(-1, u.shape[-1])

    def from_reductions(self, z_s: Tensor, lse_u: Tensor, lse: Tensor) -> Tensor:
        """Bucket log-masses ``[..., M+2]`` from the flattened reductions of the (softened) logits z: ``z_s [N, M]``
        (z on S), ``lse_u [N, 1]`` (logsumexp over U ∖ S) and ``lse [N, 1]`` (logsumexp over V)."""
        lead = self.support.shape[:-1]
        on_s = (z_s.view(*lead, -1) - lse.view(*lead, 1)).masked_fill(~self.valid, _NEG_INF)
        t_u = (lse_u - lse).view(*lead, 1)
        head = torch.logsumexp(torch.cat([on_s, t_u], dim=-1), dim=-1, keepdim=True)
        t_s = log1mexp(head)
        return torch.cat([on_s, t_u, t_s], dim=-1).masked_fill(self.log_count == _NEG_INF, _NEG_INF)

    def gold_logprobs(self, labels: Tensor, teacher_logp: Tensor | None = None) -> Tensor:
        """log p̂_k(y) ``[..., K]`` at the gold token y: exact where y is in teacher k's top-k, its per-token tail
        value elsewhere, and 0 where ``labels`` is negative (-100: not counted, never used as an index)."""
        lp = self.teacher_logp if teacher_logp is None else teacher_logp
        M = self.support.shape[-1]
        y = labels.long().clamp_min(0).unsqueeze(-1)
        pos = torch.searchsorted(self.support.contiguous(), y.contiguous()).clamp_max(M - 1)  # first occurrence
        hit = self.support.gather(-1, pos) == y
        y_in_u = torch.isin(y, self.unsafe_ids) if self.unsafe_ids is not None else torch.zeros_like(hit)
        idx = torch.where(hit, pos, torch.where(y_in_u, M, M + 1))                            # [..., 1]
        out = lp.gather(-1, idx.unsqueeze(-2).expand(*lp.shape[:-1], 1)).squeeze(-1) - self.log_count.gather(-1, idx)
        return torch.where((labels >= 0).unsqueeze(-1), out, out.new_zeros(()))

    def expand(self, logp: Tensor) -> Tensor:
        """Bucket log-masses ``[..., M+2]`` (or ``[..., K, M+2]``) as the uniform-tail distribution over the
        vocabulary ``[..., V]`` (``[..., K, V]``): S exact, each tail bucket's mass spread over its tokens."""
        extra = logp.dim() - self.log_count.dim()
        lc = self.log_count
        for _ in range(extra):
            lc = lc.unsqueeze(-2)
        per = torch.where(lc > _NEG_INF, logp - lc, _NEG_INF)
        M = self.support.shape[-1]
        u_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=logp.device)
        if self.unsafe_ids is not None:
            u_mask[self.unsafe_ids] = True
        out = torch.where(u_mask, per[..., M:M + 1], per[..., M + 1:M + 2])
        # a repeated id's slot takes the value of its first occurrence (so scatter order cannot matter)
        first = torch.where(self.valid, torch.arange(M, device=logp.device), 0).cummax(-1).values
        vals = per[..., :M]
        ids = self.support
        for _ in range(extra):
            first, ids = first.unsqueeze(-2), ids.unsqueeze(-2)
        first = first.expand(*vals.shape)
        return out.scatter(-1, ids.expand(*vals.shape), vals.gather(-1, first))


class _GatherLSE(torch.autograd.Function):
    """z ``[N, V]`` → (z on the support ``[N, M]``, logsumexp of z over U ∖ S ``[N, 1]``, logsumexp of z ``[N, 1]``).

    Backward: ∂/∂z = g_lse·softmax(z) + scatter(g_S on S) + g_U·softmax_{U∖S}(z) on U, written into one ``[N, V]``
    buffer (autograd's generic path allocates one per term and adds them)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, support: Tensor, unsafe_ids: Tensor | None, in_s: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        z_s = z.gather(-1, support)
        if unsafe_ids is not None:
            z_u = z.index_select(1, unsafe_ids).masked_fill_(in_s, _EMPTY)
            lse_u = torch.logsumexp(z_u, dim=-1, keepdim=True)
        else:
            z_u, lse_u = None, torch.full_like(lse, _NEG_INF)
        ctx.save_for_backward(z, support, lse, z_u, lse_u, unsafe_ids)
        return z_s, lse_u, lse

    @staticmethod
    def backward(ctx: Any, g_s: Tensor, g_u: Tensor, g_lse: Tensor) -> tuple[Tensor | None, None, None, None]:
        z, support, lse, z_u, lse_u, unsafe_ids = ctx.saved_tensors
        grad = torch.sub(z, lse).exp_().mul_(g_lse)
        grad.scatter_add_(-1, support, g_s)
        if unsafe_ids is not None:
            grad.index_add_(1, unsafe_ids, (z_u - lse_u).exp_().mul_(g_u))
        return grad, None, None, None


@dataclass(eq=False)
class SparseTargets:
    """The bucket view of one batch's targets: ``buckets`` and the pooled, corrected ``target_logp [..., M+2]``."""

    buckets: Buckets
    target_logp: Tensor

    def divergence(self, fn: Callable[..., Any], student_logits: Tensor | StudentHidden, mask: Tensor,
                   temperature: float, ctx: C.MeasureContext | None = None,
                   constraints: tuple[C.StudentConstraint, ...] = ()) -> Any:
        """``fn`` (a safekd divergence, possibly a ``functools.partial`` of one, or a user callable with the same
        signature) between the bucketed target and the bucketed student (see :func:`sparse_divergence`). A
        :class:`~safekd.head.StudentHidden` student is read in one chunked pass (:func:`hidden_pass`) that also
        measures what ``constraints`` read from it into ``ctx``."""
        student_logp = None
        if isinstance(student_logits, StudentHidden):
            student_logp = hidden_pass(self.buckets, student_logits, temperature, ctx, constraints)
        return sparse_divergence(fn, self.buckets, self.target_logp, student_logits, mask, temperature,
                                 student_logp=student_logp)

    def unsafe_mass(self, u: UnsafeSet, batch: Mapping[str, Any] | None = None) -> Tensor:
        """q_t(U) of the pooled target ``[...]``: summed over the buckets inside U when U is the unsafe set the
        buckets were built with (exact: a bucket lies wholly inside or outside it), else on the dense view."""
        b = self.buckets
        if u.ids is not None and b.unsafe_ids is not None and torch.equal(u.ids.to(b.unsafe_ids.device),
                                                                          b.unsafe_ids):
            return torch.logsumexp(self.target_logp.masked_fill(~b.in_unsafe, _NEG_INF), dim=-1).exp()
        return u.mass(b.expand(self.target_logp), batch)


def sparse_divergence(fn: Callable[..., Any], buckets: Buckets, target_logp: Tensor, student_logits: Tensor | None,
                      mask: Tensor | None = None, temperature: float = 1.0, *,
                      student_logp: Tensor | None = None) -> Any:
    """D(target ‖ student) on the buckets: both softened per token at ``temperature``, then ``fn`` on
    ``[..., M+2]``; the result keeps ``fn``'s T² scaling and token counts. ``student_logp`` (the student's bucket
    log-masses at ``temperature``, e.g. from :func:`hidden_pass`) replaces ``student_logits``.

    Raises:
        ValueError: a user divergence (not one of :data:`safekd.divergences.DIVERGENCES`) with temperature ≠ 1
            (its own softening would treat a tail bucket as one token).
    """
    from safekd.targets.divergences import DIVERGENCES

    base, kw = (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})
    empty = buckets.log_count == _NEG_INF
    if student_logp is None:
        if not isinstance(student_logits, Tensor):
            raise TypeError("sparse_divergence needs student logits [..., V] or student_logp [..., M+2]")
        student_logp = buckets.student_logp(student_logits, temperature)
    student = student_logp.masked_fill(empty, _EMPTY)
    target = _soften(target_logp, buckets.log_count, temperature).to(student.dtype).masked_fill(empty, _EMPTY)
    if base in DIVERGENCES.values():
        kw.update(soften_target=False, student_logp=student)
        return base(target, student, mask=mask, temperature=temperature, **kw)
    if temperature != 1.0:
        raise ValueError("a custom divergence with temperature != 1 cannot be applied to sparse teachers (a tail "
                         "bucket is many tokens); use a safekd divergence or temperature 1")
    return fn(target, student, mask=mask, temperature=1.0)


def correct_unsafe(target: Tensor, buckets: Buckets, relaxed: Tensor, thresholds: list[float]) -> tuple[Tensor,
                                                                                                     Tensor]:
    """The target correction on buckets (:func:`~safekd.unsafe.cap_unsafe_mass` on the relaxed tokens; exact: a
    bucket lies wholly inside or outside U, and a bucket of n tokens takes n shares of a uniform safe mass).
    Returns the target and the corrected-token mask."""
    done = torch.zeros_like(relaxed)
    if not thresholds or not bool(relaxed.any()):
        return target, done
    for eps in thresholds:
        target, need = cap_unsafe_mass(target, buckets.in_unsafe, eps, buckets.log_count, rows=relaxed)
        done |= need
    return target, done


@dataclass
class SparseContext(C.MeasureContext):
    """A :class:`~safekd.constraints.MeasureContext` for sparse teachers: ``teacher_unsafe_mass [..., K]`` is the
    exact p_k(U) the ``unsafe_mass`` rows read (``teacher_logprobs`` holds the bucket view). For a
    :class:`~safekd.head.StudentHidden` student ``student_logits`` is None and ``student_stats`` holds what the
    student constraints read, measured by :func:`hidden_pass`."""

    teacher_unsafe_mass: Tensor | None = None
    student_stats: "HiddenStats | None" = None

    def _stats(self) -> "HiddenStats":
        if self.student_stats is None:
            raise RuntimeError("the student (hidden states + LM head) has not been read yet: the constraints of a "
                               "StudentHidden student are measured by the step's chunked pass (hidden_pass)")
        return self.student_stats

    def student_unsafe_mass(self, u: UnsafeSet) -> Tensor:
        if self.student_logits is not None:
            return super().student_unsafe_mass(u)
        for known, log_mass in self._stats().unsafe:
            if known == u:
                return log_mass.exp()
        raise RuntimeError(f"the chunked pass did not measure the student's mass on {u!r}")

    def student_logp_at(self, ids: Tensor) -> Tensor:
        if self.student_logits is not None:
            return super().student_logp_at(ids)
        for known, logp in self._stats().at:
            if known is ids or torch.equal(known, ids):
                return logp
        raise RuntimeError("the chunked pass did not gather the student's log-probabilities at these ids")

    def student_argmax(self) -> Tensor:
        if self.student_logits is not None:
            return super().student_argmax()
        out = self._stats().argmax
        if out is None:
            raise RuntimeError("the chunked pass did not compute the student's argmax")
        return out


@dataclass(frozen=True, eq=False)
class HiddenStats:
    """What the student constraints read from a :class:`~safekd.head.StudentHidden` student (token shape
    ``[...]``): ``unsafe`` = [(U, log p_θ(U) [...])], ``at`` = [(ids [...], log p_θ(ids) [...])], ``argmax [...]``."""

    unsafe: list[tuple[UnsafeSet, Tensor]]
    at: list[tuple[Tensor, Tensor]]
    argmax: Tensor | None


def check_hidden_student(constraints: tuple[C.StudentConstraint, ...], unsafe: UnsafeSet | None) -> None:
    """Refuse, before anything runs, the student constraints a :class:`~safekd.head.StudentHidden` student cannot
    serve without its full logits.

    Raises:
        ValueError: ``kl_to``, ``metric`` or a callable ``retain`` (they read ``[..., V]`` student logits), or an
            ``unsafe_rate`` whose unsafe set is a callable (the chunked pass needs ids).
    """
    for c in constraints:
        full = isinstance(c, (C.KLTo, C.Metric)) or (isinstance(c, C.Retain) and callable(c.metric))
        u = (c.unsafe if c.unsafe is not None else unsafe) if isinstance(c, C.UnsafeRate) else None
        if full or (u is not None and u.ids is None):
            why = "reads the student's full logits" if full else "has an unsafe set given as a callable, not ids"
            raise ValueError(f"constraint {c.name!r} {why}: a student that returns StudentHidden (hidden states + "
                             "LM head) supports unsafe_rate (id sets) and retain accuracy/target_agreement; return "
                             "logits from the student for this spec")


def hidden_pass(buckets: Buckets, student: StudentHidden, temperature: float, ctx: C.MeasureContext | None,
                constraints: tuple[C.StudentConstraint, ...] = ()) -> Tensor:
    """One chunked pass over the LM head (:func:`~safekd.head.head_reductions`) for everything a step reads from
    the student: z on the support S, logsumexp(z/T) and logsumexp over U ∖ S of z/T → the bucket log-masses at T
    (returned, ``[..., M+2]``, as :meth:`Buckets.student_logp` gives from logits); and for ``constraints``, into
    ``ctx.student_stats``: log p_θ(U) = logsumexp_U z − logsumexp z (``unsafe_rate``), log p_θ(y) = z_y − logsumexp z
    at the retain references and argmax_v z_v (``retain``), all at temperature 1."""
    M = buckets.support.shape[-1]
    lead = buckets.support.shape[:-1]
    gathers, temps = [buckets.support.reshape(-1, M)], [float(temperature)]
    sets: list[tuple[int, Tensor, Tensor | None]] = []
    if buckets.unsafe_ids is not None:
        sets.append((0, buckets.unsafe_ids, buckets.unsafe_in_support()))
    rates = [c for c in constraints if isinstance(c, C.UnsafeRate)]
    retains = [c for c in constraints if isinstance(c, C.Retain)]
    if (rates or retains) and temperature != 1.0:
        temps.append(1.0)
    one = temps.index(1.0) if (rates or retains) else 0
    unsafe_sets: list[UnsafeSet] = []
    for c in rates:
        assert ctx is not None
        u = ctx.unsafe_for(c.unsafe, c.name)
        if u not in unsafe_sets:
            u._check_ids(student.vocab_size)
            unsafe_sets.append(u)
            sets.append((one, u.ids.to(buckets.support.device), None))  # type: ignore[union-attr]
    refs = []
    for c in retains:
        assert ctx is not None
        ref = c.reference(ctx).clamp_min(0).long()  # what Retain.measure asks for
        if not any(torch.equal(r, ref) for r in refs):
            refs.append(ref)
            gathers.append(ref.reshape(-1, 1).to(buckets.support.device))
    red = head_reductions(student, torch.cat(gathers, dim=1), temps, sets, argmax=bool(retains))
    z_s = red.gathered[:, :M] if temperature == 1.0 else red.gathered[:, :M] / temperature
    lse_u = red.set_lse[:, :1] if buckets.unsafe_ids is not None else torch.full_like(red.lse[:, :1], _NEG_INF)
    out = buckets.from_reductions(z_s, lse_u, red.lse[:, :1])
    if ctx is not None and isinstance(ctx, SparseContext) and (rates or retains):
        lse1 = red.lse[:, one]
        first = 1 if buckets.unsafe_ids is not None else 0
        ctx.student_stats = HiddenStats(
            unsafe=[(u, (red.set_lse[:, first + j] - lse1).view(lead)) for j, u in enumerate(unsafe_sets)],
            at=[(r, (red.gathered[:, M + j] - lse1).view(lead)) for j, r in enumerate(refs)],
            argmax=None if red.argmax is None else red.argmax.view(lead))
    return out


def token_rows(c: C.TeacherWeightConstraint, ctx: C.MeasureContext, sel: Tensor) -> tuple[Tensor, Tensor]:
    """The halfspace rows ``(a [N, K], b [N])`` of a per-token constraint; for ``unsafe_mass`` on sparse teachers
    a_k = the stored exact p_k(U) (never a top-k sum).

    Raises:
        ValueError: an ``unsafe_mass`` constraint with its own unsafe set, other than the one the cache holds.
    """
    if isinstance(c, C.UnsafeMass) and isinstance(ctx, SparseContext):
        if c.unsafe is not None and c.unsafe != ctx.unsafe:
            raise ValueError(f"constraint {c.name!r} has its own unsafe set; sparse teachers carry p_k(U) for the "
                             "spec's unsafe set only (move the set to the spec, or cache dense logits)")
        mass = ctx.teacher_unsafe_mass
        if mass is None:
            raise ValueError(f"constraint {c.name!r} needs batch['teacher_unsafe_mass'] with sparse teachers")
        a = mass[sel]
        return a, torch.full(a.shape[:-1], c.threshold, dtype=a.dtype, device=a.device)
    return c.token_rows(ctx, sel)


def distiller_targets(d: Any, batch: Mapping[str, Any], teachers: SparseTeachers,
                      student_logits: Tensor | StudentHidden, expand: bool) -> Any:
    """The :class:`~safekd.targets.TargetPipeline` ``d`` for sparse teachers: the same
    pipeline on the buckets (weights, projection with the exact unsafe rows, pool, correction). ``expand`` also
    writes the dense uniform-tail views ``[..., K, V]`` / ``[..., V]`` into ``teacher_logp`` / ``target_logp``
    (the audit's view); without it (training) those hold the bucket view and ``Targets.sparse`` carries it.
    A :class:`~safekd.head.StudentHidden` student is not read here (weighting operators get no student logits):
    the step reads it in :meth:`SparseTargets.divergence`."""
    from safekd.targets.pipeline import Targets, _check_labels, require_finite

    hidden = isinstance(student_logits, StudentHidden)
    if hidden:
        check_hidden_student(d.student_constraints, d.spec.unsafe)
        require_finite("student hidden states", student_logits.hidden.detach())
    elif not isinstance(student_logits, Tensor):
        raise TypeError(f"the student must return a logits tensor (or a StudentHidden), got "
                        f"{type(student_logits).__name__}")
    else:
        require_finite("student logits", student_logits.detach())
    if student_logits.shape[:-1] != teachers.ids.shape[:-2]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} do not match the sparse teachers "
                         f"{tuple(teachers.ids.shape)} (expected [..., V] and [..., K, k])")
    _check_labels(batch, student_logits.shape[-1])
    for scale, op in d.weighting.items():  # the teachers are buckets here, the student's logits [..., V]: no common axis
        needs = getattr(op, "requires", frozenset())
        if "student_logits" in needs and needs & {"teacher_logits", "teacher_logprobs"}:
            raise ValueError(f"weighting operator {type(op).__name__} ({scale} scale) compares the student's and the "
                             f"teachers' distributions over the vocabulary: it needs dense teacher logits, not a sparse "
                             f"top-k cache")
    if any(t != 1.0 for t in d.spec.teacher_temperatures()):
        raise ValueError("teacher temperatures need dense teacher logits: a sparse cache holds log-probabilities "
                         "at temperature 1 (cache the teachers at their temperature, or drop `temperature:`)")
    # the bucket view is [..., K, K·k + 2]: small enough for float64 (exact weights and unsafe rows) except on MPS
    dtype = torch.float64 if student_logits.device.type != "mps" else torch.float32
    needs_u = teachers.unsafe_mass is not None or bool(d.unsafe_mass_constraints)
    with torch.no_grad():
        b = teachers.buckets(student_logits.shape[-1], d.spec.unsafe if needs_u else None, dtype)
        lp = b.teacher_logp
        dense_teachers = expand or any(isinstance(c, C.KLTo) for c in d.student_constraints)
        ctx = SparseContext(student_logits=None if hidden else student_logits, batch=batch,
                            teacher_logprobs=b.expand(lp).to(student_logits.dtype) if dense_teachers else lp,
                            teacher_index=d.teacher_index, unsafe=d.spec.unsafe,
                            teacher_unsafe_mass=None if teachers.unsafe_mass is None else teachers.unsafe_mass.to(dtype))
        mask = ctx.mask
        labels = batch.get("labels")
        gold = None if labels is None else b.gold_logprobs(torch.as_tensor(labels, device=lp.device))
        per_scale, composed = d._weights(batch, None, lp, None if hidden else student_logits, mask,
                                         sampled_logprobs=gold)
        weights, fset, relaxed, stats = d._project(composed, ctx, mask)
        target, corrected = correct_unsafe(d.pool(lp, weights), b, relaxed,
                                           [c.threshold for c in d.unsafe_mass_constraints])
        stats["corrected_tokens"] = int(corrected.sum())
        if stats["corrected_tokens"]:
            logger.info("step %d: corrected the pooled target on %d token(s) with empty teacher-weight sets",
                        d.step_count + 1, stats["corrected_tokens"])
        needs_dense_target = expand or any(isinstance(c, C.Retain) and c.metric == "target_agreement"
                                           for c in d.student_constraints)
        dense_target = b.expand(target).to(student_logits.dtype) if needs_dense_target else target
    ctx.target_logp = dense_target
    teacher_view = ctx.teacher_logprobs
    return Targets(teacher_logits=teacher_view, teacher_logp=teacher_view, mask=mask, per_scale=per_scale,
                   composed=composed, weights=weights, feasible_set=fset, relaxed=relaxed, corrected=corrected,
                   target_logp=dense_target, projection=stats, context=ctx,
                   sparse=SparseTargets(buckets=b, target_logp=target))
