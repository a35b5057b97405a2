"""Provenance for audit reports (hashes, sizes, versions) and training traces read from a JSONL step log."""
from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["spec_hash", "parameter_digest", "package_versions", "read_traces", "provenance", "weight_record"]

_PACKAGES = ("safekd", "torch", "numpy", "scipy", "scikit-learn", "cvxpy", "matplotlib")


def spec_hash(spec_dict: Mapping[str, Any]) -> str:
    """SHA-256 of the spec's canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(spec_dict, sort_keys=True, separators=(",", ":"), default=str)
                          .encode("utf-8")).hexdigest()


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 over the student's state dict: each entry's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of safekd and its main dependencies, plus Python."""
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(spec_dict: Mapping[str, Any], student: nn.Module, data_size: int, seed: int | None) -> dict[str, Any]:
    return {"spec_hash": spec_hash(spec_dict), "student_digest": parameter_digest(student), "data_size": int(data_size),
            "seed": seed, "versions": package_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _flatten(prefix: str, x: Any, out: dict[str, float | None]) -> None:
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        out[prefix] = float(x) if math.isfinite(x) else None
    elif x is None:
        out[prefix] = None
    elif isinstance(x, Mapping):
        for k, v in x.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(x, list) and x and all(isinstance(v, (int, float, type(None))) and not isinstance(v, bool)
                                           for v in x) and len(x) <= 64:
        for i, v in enumerate(x):
            _flatten(f"{prefix}/{i}", v, out)


def read_traces(path: str | Path, teacher_names: list[str] | None = None, max_points: int = 2000) -> dict[str, Any]:
    """Series over steps from a JSONL step log: every numeric field, nested dicts flattened with ``/``.

    Lists of numbers become ``name/i`` (``name/<teacher>`` when the list has one entry per teacher). A record's
    step is its ``step`` field (else its line index). Long logs are thinned to about ``max_points`` records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"step log {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
    stride = max(1, math.ceil(len(records) / max_points))
    records = records[::stride]
    steps: list[int] = []
    flat: list[dict[str, float | None]] = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            continue
        f: dict[str, float | None] = {}
        _flatten("", {k: v for k, v in r.items() if k != "step"}, f)
        if teacher_names:
            f = {_teacher_key(k, teacher_names): v for k, v in f.items()}
        steps.append(int(r.get("step", i)))
        flat.append(f)
    names = sorted({k for f in flat for k in f})
    return {"step": steps, "series": {n: [f.get(n) for f in flat] for n in names}}


def _teacher_key(key: str, teacher_names: list[str]) -> str:
    head, _, tail = key.rpartition("/")
    if head and tail.isdigit() and int(tail) < len(teacher_names):
        return f"{head}/{teacher_names[int(tail)]}"
    return key


def weight_record(path: str | Path, teacher_names: list[str]) -> dict[str, tuple[float, float, int]]:
    """``{teacher: (min, max, steps)}`` of the batch-mean projected weight over every record of a JSONL step log
    (the training record of the teachers' weights; read line by line, never thinned). Teachers absent from the
    log are absent from the result."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"step log {str(path)!r} does not exist")
    out: dict[str, tuple[float, float, int]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
            projected = rec.get("weights", {}).get("projected", {}) if isinstance(rec, Mapping) else {}
            for t in teacher_names:
                w = projected.get(t) if isinstance(projected, Mapping) else None
                if isinstance(w, (int, float)) and math.isfinite(w):
                    lo, hi, k = out.get(t, (math.inf, -math.inf, 0))
                    out[t] = (min(lo, float(w)), max(hi, float(w)), k + 1)
    return out
