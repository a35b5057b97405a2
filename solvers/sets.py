"""`FeasibleSet`: the immutable description of {w ∈ Δ_K : lower ≤ w ≤ upper, A w ≤ b}.

Sign convention (stated once): every row is ``a_r·w − b_r ≤ 0``; ``residual`` is signed (negative = slack)
and ``violation = max(residual, 0)``. All tensors may carry leading batch dimensions (one set per token):
``lower, upper: [..., K]``, ``A: [..., m, K]``, ``b: [..., m]``; they broadcast against each other.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from solvers.errors import holds

if TYPE_CHECKING:  # pragma: no cover
    from solvers.results import ProjectionResult

__all__ = ["FeasibleSet"]

logger = logging.getLogger(__name__)

Scalar = float | int | Tensor


def _check_finite(name: str, t: Tensor) -> None:
    if not holds(torch.isfinite(t).all(), f"{name} contains NaN or inf"):
        raise ValueError(f"{name} contains NaN or inf")


def _as_tensor(name: str, x: Scalar | Sequence[float], like: Tensor) -> Tensor:
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if not t.is_floating_point():
        t = t.to(like.dtype)
    _check_finite(name, t)
    return t


def _checked_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a ``torch.device`` after checking this torch build can allocate on it (``None`` passes)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
        if dev.type != "cpu":
            torch.empty(0, device=dev)  # no kernel, no synchronisation
    except (AssertionError, RuntimeError, NotImplementedError) as exc:
        reason = " ".join(str(exc).split()).split(". ")[0][:120]
        raise ValueError(f"device={str(device)!r} is not usable with this torch build ({reason}); use device='cpu' "
                         "or install a torch build for that device") from None
    return dev


@dataclass(frozen=True, eq=False)
class FeasibleSet:
    """{w ∈ Δ_K : lower ≤ w ≤ upper, A w ≤ b}; build with :meth:`simplex` and the chaining constructors.

    ``lower``/``upper`` are clipped to [0, 1] (the simplex implies those bounds). ``row_names`` name the rows of
    ``A`` (default ``row[0]``, ``row[1]``, …; the chaining constructors name theirs). ``lower_names[i]`` /
    ``upper_names[i]`` name the constraint that set bound ``i`` (``None`` = structural 0 or 1).
    ``hard_rows[r]`` marks row ``r`` as never relaxed: where a batch element's set is empty, only the other
    (soft) rows are relaxed, by the least uniform amount (all rows are soft by default).
    ``chain`` (set by the first :meth:`order_by`): the permutation ``[..., K]`` (descending scores) whose K−1
    ordinal rows start at row ``chain_start``; ``None`` otherwise. The projection uses it for a closed-form
    fast path (isotonic regression) and verifies the result against the rows themselves.
    """

    lower: Tensor
    upper: Tensor
    A: Tensor
    b: Tensor
    row_names: tuple[str, ...] = ()
    lower_names: tuple[str | None, ...] = ()
    upper_names: tuple[str | None, ...] = ()
    hard_rows: tuple[bool, ...] = ()
    chain: Tensor | None = None
    chain_start: int = 0
    _batch_shape: torch.Size = field(default=torch.Size(), repr=False)

    def __post_init__(self) -> None:
        lower, upper, A, b = self.lower, self.upper, self.A, self.b
        for name, t in (("lower", lower), ("upper", upper), ("A", A), ("b", b)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if lower.dim() < 1:
            raise ValueError("lower must have shape [..., K]")
        K = lower.shape[-1]
        if K < 1:
            raise ValueError("K must be at least 1")
        if upper.dim() < 1 or upper.shape[-1] != K:
            raise ValueError(f"upper must have shape [..., K={K}], got {tuple(upper.shape)}")
        if A.dim() < 2 or A.shape[-1] != K:
            raise ValueError(f"A must have shape [..., m, K={K}], got {tuple(A.shape)}")
        m = A.shape[-2]
        if b.dim() < 1 or b.shape[-1] != m:
            raise ValueError(f"b must have shape [..., m={m}], got {tuple(b.shape)}")
        dtypes = {t.dtype for t in (lower, upper, A, b)}
        devices = {t.device for t in (lower, upper, A, b)}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"lower, upper, A, b must share dtype and device, got {dtypes} / {devices}")
        for name, t in (("lower", lower), ("upper", upper), ("A", A), ("b", b)):
            _check_finite(name, t)
        chain_batch: tuple[int, ...] = ()
        if self.chain is not None:
            c = self.chain
            if not isinstance(c, Tensor) or c.dtype != torch.long or c.dim() < 1 or c.shape[-1] != K:
                raise ValueError(f"chain must be a LongTensor of shape [..., K={K}]")
            if not 0 <= self.chain_start <= m - (K - 1):
                raise ValueError(f"chain_start={self.chain_start} does not leave K-1={K - 1} rows in m={m}")
            chain_batch = tuple(c.shape[:-1])
        try:
            batch = torch.broadcast_shapes(lower.shape[:-1], upper.shape[:-1], A.shape[:-2], b.shape[:-1], chain_batch)
        except RuntimeError as exc:
            raise ValueError(f"batch dims of lower/upper/A/b do not broadcast: {exc}") from None
        names = tuple(self.row_names) or tuple(f"row[{r}]" for r in range(m))
        if len(names) != m:
            raise ValueError(f"row_names must have length m={m} (one name per row of A), got {len(names)}; "
                             "pass one per row or leave it out for row[0], row[1], ...")
        hard = tuple(bool(h) for h in self.hard_rows) or (False,) * m
        if len(hard) != m:
            raise ValueError(f"hard_rows must have length m={m}, got {len(hard)}")
        ln = self.lower_names or (None,) * K
        un = self.upper_names or (None,) * K
        if len(ln) != K or len(un) != K:
            raise ValueError(f"lower_names/upper_names must have length K={K}")
        bad = lower > upper
        if not holds(~bad.any(), "lower > upper at some coordinate"):
            i = int(bad.reshape(-1, K).any(0).nonzero()[0])
            raise ValueError(
                f"lower > upper at coordinate {i}: lower bound {ln[i] or 'lower'} exceeds upper bound {un[i] or 'upper'}"
            )
        object.__setattr__(self, "lower", lower.clamp(0.0, 1.0))
        object.__setattr__(self, "upper", upper.clamp(0.0, 1.0))
        object.__setattr__(self, "lower_names", tuple(ln))
        object.__setattr__(self, "upper_names", tuple(un))
        object.__setattr__(self, "row_names", names)
        object.__setattr__(self, "hard_rows", hard)
        object.__setattr__(self, "_batch_shape", torch.Size(batch))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def simplex(cls, K: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "FeasibleSet":
        """The probability simplex Δ_K = {w ≥ 0, Σ w = 1}."""
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"K must be a positive int, got {K!r}")
        z = torch.zeros(K, dtype=dtype, device=_checked_device(device))
        return cls(z, torch.ones_like(z), z.new_zeros(0, K), z.new_zeros(0), ())

    @property
    def K(self) -> int:
        return self.lower.shape[-1]

    @property
    def num_rows(self) -> int:
        return self.A.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self._batch_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.lower.dtype

    @property
    def device(self) -> torch.device:
        return self.lower.device

    def _index(self, i: int) -> int:
        if not isinstance(i, int) or not -self.K <= i < self.K:
            raise ValueError(f"coordinate index must be an int in [0, {self.K}), got {i!r}")
        return i % self.K

    def _bound(self, which: str, i: int, value: Scalar, name: str | None) -> "FeasibleSet":
        i = self._index(i)
        val = _as_tensor("value", value, self.lower)
        onehot = torch.zeros(self.K, dtype=torch.bool, device=self.device)
        onehot[i] = True
        old = getattr(self, which)
        new = torch.where(onehot, torch.minimum(old, val[..., None]) if which == "upper" else torch.maximum(old, val[..., None]), old)
        names = list(getattr(self, f"{which}_names"))
        names[i] = name or (f"cap[{i}]" if which == "upper" else f"floor[{i}]")
        return replace(self, **{which: new, f"{which}_names": tuple(names)})

    def cap(self, i: int, value: Scalar, name: str | None = None) -> "FeasibleSet":
        """w_i ≤ value (tightens ``upper``); ``value`` scalar or per-token ``[...]``."""
        return self._bound("upper", i, value, name)

    def floor(self, i: int, value: Scalar, name: str | None = None) -> "FeasibleSet":
        """w_i ≥ value (tightens ``lower``); ``value`` scalar or per-token ``[...]``."""
        return self._bound("lower", i, value, name)

    def box(self, lower: Scalar | None = None, upper: Scalar | None = None, name: str = "box") -> "FeasibleSet":
        """Per-coordinate floors/caps at once: ``lower ≤ w ≤ upper`` (each scalar, ``[K]`` or ``[..., K]``)."""
        out = self
        if lower is not None:
            lo = _as_tensor("lower", lower, self.lower)
            out = replace(out, lower=torch.maximum(out.lower, lo),
                          lower_names=tuple(f"{name}.lower[{i}]" for i in range(self.K)))
        if upper is not None:
            hi = _as_tensor("upper", upper, self.lower)
            out = replace(out, upper=torch.minimum(out.upper, hi),
                          upper_names=tuple(f"{name}.upper[{i}]" for i in range(self.K)))
        return out

    def _add_rows(self, a: Tensor, b: Tensor, names: tuple[str, ...], hard: bool) -> "FeasibleSet":
        """Append rows ``a: [..., r, K]``, ``b: [..., r]`` (broadcast against the existing batch); ``hard``: never
        relaxed when a batch element's set is empty."""
        batch = torch.broadcast_shapes(self.A.shape[:-2], self.b.shape[:-1], a.shape[:-2], b.shape[:-1])
        m, r = self.num_rows, a.shape[-2]
        A = torch.cat([self.A.expand(*batch, m, self.K), a.expand(*batch, r, self.K)], dim=-2)
        bb = torch.cat([self.b.expand(*batch, m), b.expand(*batch, r)], dim=-1)
        taken = set(self.row_names)
        for n in names:
            if n in taken:
                raise ValueError(f"row name {n!r} is already used")
            taken.add(n)
        return replace(self, A=A, b=bb, row_names=self.row_names + names, hard_rows=self.hard_rows + (hard,) * r)

    def halfspace(self, a: Scalar | Sequence[float], bound: Scalar, name: str | None = None, *,
                  hard: bool = False) -> "FeasibleSet":
        """Row a·w ≤ bound; ``a: [K]`` or ``[..., K]``, ``bound`` scalar or ``[...]`` (per-token allowed)."""
        a_t = _as_tensor("a", a, self.lower)
        if a_t.dim() < 1 or a_t.shape[-1] != self.K:
            raise ValueError(f"a must have shape [..., K={self.K}], got {tuple(a_t.shape)}")
        b_t = _as_tensor("bound", bound, self.lower)
        return self._add_rows(a_t[..., None, :], b_t[..., None], (name or f"halfspace[{self.num_rows}]",), hard)

    def group_cap(self, indices: Sequence[int], value: Scalar, name: str | None = None, *,
                  hard: bool = False) -> "FeasibleSet":
        """Group budget Σ_{i∈G} w_i ≤ value."""
        idx = [self._index(i) for i in indices]
        if not idx:
            raise ValueError("indices must name at least one coordinate")
        a = torch.zeros(self.K, dtype=self.dtype, device=self.device)
        a[idx] = 1.0
        return self.halfspace(a, value, name or f"group_cap{tuple(idx)}", hard=hard)

    def order(self, i: int, j: int, name: str | None = None, *, hard: bool = False) -> "FeasibleSet":
        """Ordinal row w_i ≥ w_j, stored as w_j − w_i ≤ 0."""
        i, j = self._index(i), self._index(j)
        if i == j:
            raise ValueError("order(i, j) needs i != j")
        a = torch.zeros(self.K, dtype=self.dtype, device=self.device)
        a[j], a[i] = 1.0, -1.0
        return self.halfspace(a, 0.0, name or f"order(w{i}>=w{j})", hard=hard)

    def order_by(self, scores: Tensor | Sequence[float], name: str = "order_by", *, hard: bool = False) -> "FeasibleSet":
        """w ordered like ``scores`` ([K] or [..., K]): K−1 rows w_{(k+1)} − w_{(k)} ≤ 0 for consecutive
        coordinates in descending score order; tied pairs give an all-zero (always satisfied) row. The first
        ``order_by`` of a set records its permutation as ``chain`` (see the class docstring)."""
        s = _as_tensor("scores", scores, self.lower)
        if s.dim() < 1 or s.shape[-1] != self.K:
            raise ValueError(f"scores must have shape [..., K={self.K}], got {tuple(s.shape)}")
        if self.K == 1:
            return self
        s_sorted, perm = s.sort(dim=-1, descending=True)
        eye = torch.eye(self.K, dtype=self.dtype, device=self.device)
        E = eye[perm]  # [..., K, K]: row k = e_{perm[k]}
        strict = (s_sorted[..., :-1] > s_sorted[..., 1:]).to(self.dtype)[..., None]
        a = (E[..., 1:, :] - E[..., :-1, :]) * strict
        b = torch.zeros(a.shape[:-1], dtype=self.dtype, device=self.device)
        out = self._add_rows(a, b, tuple(f"{name}[{k}]" for k in range(self.K - 1)), hard)
        if self.chain is None:
            out = replace(out, chain=perm, chain_start=self.num_rows)
        return out

    # ------------------------------------------------------------------ evaluation
    def residual(self, w: Tensor) -> Tensor:
        """Signed row residuals ``A w − b`` → ``[..., m]``."""
        return (self.A @ w[..., :, None])[..., 0] - self.b

    def violation(self, w: Tensor) -> Tensor:
        """``max(residual, 0)`` per row."""
        return self.residual(w).clamp_min(0)

    def contains(self, w: Tensor, tol: float = 1e-9) -> Tensor:
        """BoolTensor[...]: w in the set up to ``tol`` (simplex sum, bounds and rows)."""
        ok = (w.sum(-1) - 1).abs() <= tol
        ok = ok & (w >= self.lower - tol).all(-1) & (w <= self.upper + tol).all(-1)
        if self.num_rows:
            ok = ok & (self.residual(w) <= tol).all(-1)
        return ok

    def project(self, v: Tensor, metric: str = "euclidean", return_info: bool = False) -> "Tensor | tuple[Tensor, ProjectionResult]":
        """Shorthand for :func:`solvers.project` (``v`` onto this set)."""
        from solvers.projection import project

        return project(v, self, metric=metric, return_info=return_info)

    # ------------------------------------------------------------------ conversion
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FeasibleSet":
        """The same set with its tensors moved to ``device`` and cast to ``dtype`` (``chain`` stays long)."""
        same = device is None or str(device) == str(self.device)  # the hot path: nothing to check
        kw = {"device": device if same else _checked_device(device), "dtype": dtype}
        chain = None if self.chain is None else self.chain.to(device=device)
        return replace(self, lower=self.lower.to(**kw), upper=self.upper.to(**kw), A=self.A.to(**kw), b=self.b.to(**kw),
                       chain=chain)

    def expand(self, batch_shape: Sequence[int]) -> "FeasibleSet":
        """Broadcast every tensor to ``batch_shape`` (views, no copies)."""
        bs = tuple(batch_shape)
        K, m = self.K, self.num_rows
        chain = None if self.chain is None else self.chain.expand(*bs, K)
        return self._derived(lower=self.lower.expand(*bs, K), upper=self.upper.expand(*bs, K),
                             A=self.A.expand(*bs, m, K), b=self.b.expand(*bs, m), chain=chain)

    def __getitem__(self, index: int | tuple[int, ...] | Tensor) -> "FeasibleSet":
        """The set of one batch element, or of the elements an index tensor selects (``index`` into
        ``batch_shape``)."""
        e = self.expand(self.batch_shape)
        chain = None if e.chain is None else e.chain[index]
        return self._derived(lower=e.lower[index], upper=e.upper[index], A=e.A[index], b=e.b[index], chain=chain)

    def _derived(self, **tensors: Tensor | None) -> "FeasibleSet":
        """This set with its tensors replaced by views or selections of them (already validated: no second pass
        over the data; the batch shape is recomputed)."""
        out = copy.copy(self)
        for name, t in tensors.items():
            object.__setattr__(out, name, t)
        object.__setattr__(out, "_batch_shape", torch.broadcast_shapes(
            out.lower.shape[:-1], out.upper.shape[:-1], out.A.shape[:-2], out.b.shape[:-1],
            () if out.chain is None else out.chain.shape[:-1]))
        return out

    def constraint_names(self) -> list[str]:
        """All named constraints: named bounds, rows, and the simplex equality ``sum(w)=1``."""
        names = [n for n in self.lower_names if n] + [n for n in self.upper_names if n]
        return names + list(self.row_names) + ["sum(w)=1"]
