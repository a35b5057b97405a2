"""Atomic checkpoints of a :class:`~safekd.distiller.SafeDistiller`, loadable with ``torch.load(weights_only=True)``.

The file holds only tensors and primitive containers: the distiller's ``state_dict`` (student, optimizer,
multipliers by constraint name, dual rule, weighting buffers, measurement window, alarm history, step counter,
spec) plus every RNG state (torch CPU, CUDA when present, NumPy and Python ``random``), so a run killed between
steps and resumed continues bit-identically. Writes go to ``<path>.tmp`` in the same directory, are fsynced,
then ``os.replace``-d over ``path``; under DDP and FSDP only rank 0 writes, after every rank has taken the
distiller's state (a student sharded with FSDP is gathered into full tensors, so the file loads on any number
of processes).
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from safekd.common.distributed import is_rank_zero


class Checkpointable(Protocol):
    """What this module needs of a distiller (:class:`~safekd.training.distiller.SafeDistiller`): its state and
    step counter. A protocol, not an import, so that checkpoints never import the distiller (the distiller imports
    checkpoints: one direction, no circle)."""

    step_count: int

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "load_file", "rng_state", "set_rng_state", "CheckpointError",
           "FORMAT_VERSION", "DISTILLER_STATE_KEYS", "check_module_state", "check_optimizer_state"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: dual state as alarms + relaxations (1: alarm_history/alarm_active); stability state
_KEYS = ("format_version", "distiller", "rng")
#: What every distiller state of this format holds (checked before anything is loaded).
DISTILLER_STATE_KEYS = ("step", "student", "optimizer", "multipliers", "dual_optimizer", "weighting", "meter",
                        "alarms", "relaxations", "convex_state", "events", "spec")


class CheckpointError(ValueError):
    """A file that is not a loadable safekd checkpoint (or tensor file): empty, truncated, corrupt, unsafe to
    unpickle, of the wrong shape or missing a key. The message names the file and what to do."""


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is ENOSPC (torch wraps a failed write in RuntimeError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


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


def save_checkpoint(path: str | os.PathLike[str], distiller: Checkpointable,
                    extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``distiller``'s state, the RNG states and ``extra`` (tensors and primitive containers: e.g. a training
    loop's position and data-order generator) atomically to ``path`` (temp file + fsync + rename).

    Every rank must call it (gathering a sharded student is a collective). Returns the path written, or None on
    ranks other than 0 (which write nothing).
    """
    state = distiller.state_dict()
    if not is_rank_zero():
        return None
    path = Path(path)
    payload = _interned({"format_version": FORMAT_VERSION, "distiller": state, "rng": rng_state(),
                         "extra": extra or {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if _no_space(exc):  # the previous checkpoint at `path`, if any, is left untouched
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from exc
        raise
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


def load_file(path: str | os.PathLike[str], *, what: str = "checkpoint", redo: str = "",
              map_location: str | torch.device | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error per failure, naming ``path`` and ``what`` it is.

    Without ``map_location``, tensors saved on a GPU are loaded on the CPU when CUDA is unavailable. ``redo`` is
    appended to the messages about unreadable files (how to write the file again).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, truncated or corrupt, or holds objects other than tensors and plain
            containers (which are never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "No such file", str(path))
    redo = f"; {redo}" if redo else ""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the {what} file is empty (0 bytes){redo}")
    if map_location is None and not torch.cuda.is_available():
        map_location = "cpu"  # a file written on a GPU machine loads here too
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files before failing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):
            raise CheckpointError(f"{path}: holds objects other than tensors and plain containers, which safekd "
                                  f"refuses to load (they could run code); use a {what} written by safekd") from None
        raise CheckpointError(f"{path}: not a {what} (unreadable data){redo}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        if isinstance(exc, (PermissionError, IsADirectoryError)):
            raise
        raise CheckpointError(f"{path}: the {what} is truncated or corrupt ({_first_line(exc)}){redo}") from None


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device | None = None) -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, read by :func:`load_file` and checked.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, truncated or corrupt, holds objects other than tensors and plain
            containers, is not a dict with ``format_version``, ``distiller`` and ``rng``, or has another format version.
    """
    redo = "write it again with SafeDistiller.save_checkpoint or `safekd train`"
    payload = load_file(path, what="checkpoint", redo=redo, map_location=map_location)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: holds a {type(payload).__name__}, not a safekd checkpoint (a dict with keys "
                              f"{', '.join(_KEYS)}); {redo}")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} (a safekd checkpoint has {', '.join(_KEYS)}); "
                              f"{redo}")
    version = payload["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format version {version!r} (expected {FORMAT_VERSION})")
    return payload


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ")[0].rstrip(".")[:160]


def load_checkpoint(path: str | os.PathLike[str], distiller: Checkpointable, *, restore_rng: bool = True,
                    map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Load ``path`` with ``torch.load(weights_only=True)`` into ``distiller`` (and the RNGs); returns the payload.

    The file is checked (:func:`read_checkpoint`) and the distiller state's keys compared before anything changes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: (a ``ValueError``) the file is not a loadable checkpoint, lacks a key the distiller
            needs, or its constraints/teachers differ from the distiller's; the message names the file.
    """
    payload = read_checkpoint(path, map_location)
    state = payload["distiller"]
    missing = [k for k in DISTILLER_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing key 'distiller.{missing[0]}'; the checkpoint was not written by "
                              "SafeDistiller.save_checkpoint")
    try:
        distiller.load_state_dict(state)
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing key {exc.args[0]!r} in the distiller state") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if restore_rng:
        set_rng_state(payload["rng"])
    logger.info("loaded checkpoint at step %d from %s", distiller.step_count, path)
    return payload


def check_module_state(what: str, module: nn.Module, state: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first key of ``state`` that ``module.load_state_dict`` would refuse (missing,
    unexpected, or of another shape); nothing is written."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {what} does not fit: missing keys {missing}, unexpected keys {unexpected}")
    for k, t in own.items():
        v = state[k]
        if isinstance(t, Tensor) and (not isinstance(v, Tensor) or v.shape != t.shape):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"checkpoint {what}[{k!r}] has shape {got}, this model's is {tuple(t.shape)}")


def check_optimizer_state(what: str, opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``state`` has ``opt``'s parameter groups, group sizes and per-parameter state
    shapes (what ``Optimizer.load_state_dict`` needs); nothing is written."""
    if not isinstance(state, Mapping) or "param_groups" not in state or "state" not in state:
        raise ValueError(f"checkpoint {what} is not an optimizer state_dict")
    groups, saved = opt.param_groups, state["param_groups"]
    if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
        raise ValueError(f"checkpoint {what} has parameter groups of sizes {[len(s['params']) for s in saved]}, "
                         f"this optimizer {[len(g['params']) for g in groups]} (another model or optimizer?)")
    params = {i: p for s, g in zip(saved, groups) for i, p in zip(s["params"], g["params"])}
    for i, st in state["state"].items():
        p = params.get(i)
        for key, v in (st.items() if isinstance(st, Mapping) else ()):
            if p is not None and isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"checkpoint {what} state {key!r} of parameter {i} has shape {tuple(v.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
