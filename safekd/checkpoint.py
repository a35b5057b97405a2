"""Atomic checkpoints of a :class:`~safekd.distiller.SafeDistiller`, loadable with ``torch.load(weights_only=True)``.

The file holds only tensors and primitive containers: the distiller's ``state_dict`` (student, optimizer,
multipliers by constraint name, dual rule, weighting buffers, measurement window, alarm history, step counter,
spec) plus every RNG state (torch CPU, CUDA when present, NumPy and Python ``random``), so a run killed between
steps and resumed continues bit-identically. Writes go to ``<path>.tmp`` in the same directory, are fsynced,
then ``os.replace``-d over ``path``; under DDP only rank 0 writes.
"""
from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from safekd.distributed import is_rank_zero

if TYPE_CHECKING:  # pragma: no cover
    from safekd.distiller import SafeDistiller

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Torch CPU/CUDA, NumPy and Python RNG states as tensors and lists (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available():
            logger.warning("checkpoint has CUDA RNG states but CUDA is unavailable; they are ignored")
        else:
            torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def _interned(obj: Any) -> Any:
    """``obj`` with every string interned: pickle shares equal strings only when they are the same object, so a state
    read back from a checkpoint would otherwise be written with other bytes than the same state built in-process."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_interned(k): _interned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_interned(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike[str], distiller: "SafeDistiller",
                    extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``distiller``'s state, the RNG states and ``extra`` (tensors and primitive containers: e.g. a training
    loop's position and data-order generator) atomically to ``path`` (temp file + fsync + rename).

    Returns the path written, or None on ranks other than 0 (which write nothing).
    """
    if not is_rank_zero():
        return None
    path = Path(path)
    payload = _interned({"format_version": FORMAT_VERSION, "distiller": distiller.state_dict(), "rng": rng_state(),
                         "extra": extra or {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    logger.info("saved checkpoint at step %d to %s", distiller.step_count, path)
    return path


def load_checkpoint(path: str | os.PathLike[str], distiller: "SafeDistiller", *, restore_rng: bool = True,
                    map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Load ``path`` with ``torch.load(weights_only=True)`` into ``distiller`` (and the RNGs); returns the payload.

    Raises:
        ValueError: unknown format version, or the checkpoint's constraints/teachers differ from the distiller's.
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format version {version!r} (expected {FORMAT_VERSION})")
    distiller.load_state_dict(payload["distiller"])
    if restore_rng:
        set_rng_state(payload["rng"])
    logger.info("loaded checkpoint at step %d from %s", distiller.step_count, path)
    return payload
