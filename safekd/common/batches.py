"""The one batch protocol shared by training, teacher caching and audits (see ``docs/architecture.md``).

A *data source* is either an in-memory ``Mapping[str, Tensor]`` whose tensors share a leading example axis, or
an ``Iterable`` of batches (a ``torch.utils.data.DataLoader``, a generator function's result, a list). Consumers
walk it with :func:`iter_batches`, hold one batch at a time, and accumulate sums and counts only — so memory is
bounded by the batch, never by the data set.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "DataSource", "IGNORE_INDEX", "iter_batches", "num_examples", "is_in_memory", "default_mask",
           "select_rows"]

Batch = Mapping[str, Any]
DataSource = Mapping[str, Any] | Iterable[Mapping[str, Any]]
IGNORE_INDEX = -100  # label value that marks a position as not counted (Hugging Face convention)


def default_mask(batch: Batch, token_shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """The positions that count when ``batch`` has no ``mask``: ``labels != -100`` where labels of the token shape
    exist, else every position."""
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and tuple(labels.shape) == tuple(token_shape):
        return labels.to(device) != IGNORE_INDEX
    return torch.ones(tuple(token_shape), dtype=torch.bool, device=device)


def is_in_memory(source: DataSource) -> bool:
    """True for a ``Mapping`` of tensors (one leading example axis), False for an iterable of batches."""
    return isinstance(source, Mapping)


def num_examples(source: Mapping[str, Any]) -> int:
    """Leading-axis length of an in-memory source, after checking every tensor agrees with ``inputs``.

    Raises:
        ValueError: naming the key whose row count differs, or when ``inputs`` is missing or empty.
    """
    if "inputs" not in source:
        raise ValueError(f"data must hold 'inputs' (and usually 'labels'); got keys {sorted(source)}")
    x = source["inputs"]
    n = _rows(x)
    if n is None:
        raise ValueError(f"data['inputs'] must be a tensor (or a dict of tensors) with a leading example axis, "
                         f"got {type(x).__name__}")
    if n == 0:
        raise ValueError("data['inputs'] is empty (0 examples)")
    for k, v in source.items():
        rows = _rows(v)
        if rows is not None and rows != n:
            raise ValueError(f"data[{k!r}] has {rows} rows but data['inputs'] has {n}")
    return n


def _rows(v: Any) -> int | None:
    if isinstance(v, Tensor):
        return v.shape[0] if v.dim() > 0 else None
    if isinstance(v, Mapping) and v and all(isinstance(t, Tensor) and t.dim() > 0 for t in v.values()):
        sizes = {t.shape[0] for t in v.values()}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def _take(v: Any, idx: Tensor | slice, n: int, device: torch.device | None) -> Any:
    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
        return _to(v[idx], device)
    if isinstance(v, Mapping) and _rows(v) == n:
        return {k: _take(t, idx, n, device) for k, t in v.items()}
    return v


def select_rows(batch: Mapping[str, Any], idx: Tensor | slice, device: torch.device | None = None
                ) -> dict[str, Any]:
    """Rows ``idx`` of every entry (nested dicts too) that has the leading example axis of ``batch["inputs"]``;
    other entries pass through. Tensors are moved to ``device`` when given."""
    n = _rows(batch["inputs"])
    return {k: _take(v, idx, n, device) for k, v in batch.items()}


def _to(v: Any, device: torch.device | None) -> Any:
    if device is None:
        return v
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, Mapping):
        return {k: _to(t, device) for k, t in v.items()}
    return v


def iter_batches(source: DataSource, batch_size: int | None = None, *, shuffle: bool = False,
                 generator: torch.Generator | None = None, device: str | torch.device | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Yield the batches of ``source``.

    An in-memory mapping is cut into ``batch_size`` rows (shuffled with ``generator`` when ``shuffle``); an
    iterable is passed through batch by batch (``batch_size``/``shuffle`` are the loader's business). Tensors
    are moved to ``device`` when given.
    """
    dev = torch.device(device) if device is not None else None
    if is_in_memory(source):
        n = num_examples(source)
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 for in-memory data, got {batch_size!r}")
        order = torch.randperm(n, generator=generator) if shuffle else None
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size] if order is not None else slice(s, s + batch_size)
            yield select_rows(source, idx, dev)
        return
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(f"data must be a dict of tensors or an iterable of batches (e.g. a DataLoader), "
                        f"got {type(source).__name__}")
    for i, batch in enumerate(source):
        if not isinstance(batch, Mapping) or "inputs" not in batch:
            raise ValueError(f"batch {i} of the data iterable must be a dict with 'inputs', got "
                             f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping)
                                                          else ""))
        yield {k: _to(v, dev) for k, v in batch.items()}
