"""Step log: one JSON line per :class:`~safekd.distiller.StepRecord`, a ``logging`` summary every
``summary_every`` steps, and an optional TensorBoard writer (needs the ``tensorboard`` package).

JSONL format: each line is ``StepRecord.to_dict()`` — keys ``step``, ``loss``, ``kd_loss``, ``penalty``,
``constraints`` ({name: {sense, threshold, value, residual, multiplier, count, satisfied, relaxation}}), ``weights``
({scale | "composed" | "projected": {teacher: mean weight}}), ``projection`` ({tokens, projected_tokens, active,
relaxed_tokens, corrected_tokens, max_kkt_residual}), ``alarms`` ([{constraint, message}]), ``dual_updated``,
``reference_check`` ({rows, max_abs_diff} or null).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from safekd.training.distiller import StepRecord

__all__ = ["StepLog", "read_step_log", "summarize"]

logger = logging.getLogger(__name__)


class StepLog:
    """Append step records to ``path`` (JSONL; None = no file), summarise through ``logging`` every
    ``summary_every`` steps (0 = never), and mirror scalars to TensorBoard when ``tensorboard_dir`` is given."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, summary_every: int = 50,
                 tensorboard_dir: str | os.PathLike[str] | None = None) -> None:
        if summary_every < 0:
            raise ValueError(f"summary_every must be >= 0, got {summary_every}")
        self.path = None if path is None else Path(path)
        self.summary_every = summary_every
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - depends on the optional extra
                raise ImportError("tensorboard_dir needs the 'tensorboard' package: pip install safekd[tensorboard]") \
                    from exc
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: "StepRecord") -> None:
        """Append ``record`` as one JSON line, mirror it to TensorBoard, and log a summary every ``summary_every``
        steps."""
        d = record.to_dict()
        if self._fh is not None:
            self._fh.write(json.dumps(d, allow_nan=True) + "\n")
            self._fh.flush()
        if self._tb is not None:
            self._tensorboard(d)
        if self.summary_every and d["step"] % self.summary_every == 0:
            logger.info("%s", summarize(d))
        for alarm in d["alarms"]:
            logger.debug("step %d alarm: %s", d["step"], alarm["message"])

    def _tensorboard(self, d: dict[str, Any]) -> None:
        step = d["step"]
        for key in ("loss", "kd_loss", "penalty"):
            self._tb.add_scalar(f"loss/{key}", d[key], step)  # type: ignore[union-attr]
        for name, c in d["constraints"].items():
            for key in ("value", "residual", "multiplier"):
                self._tb.add_scalar(f"constraints/{name}/{key}", c[key], step)  # type: ignore[union-attr]
        for teacher, w in d["weights"].get("projected", {}).items():
            self._tb.add_scalar(f"weights/{teacher}", w, step)  # type: ignore[union-attr]
        self._tb.add_scalar("projection/relaxed_tokens", d["projection"].get("relaxed_tokens", 0), step)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summarize(d: dict[str, Any]) -> str:
    """One line: step, losses, each constraint's value/threshold/λ, relaxed/corrected tokens, alarms."""
    parts = [f"step {d['step']}: loss {d['loss']:.4g} (kd {d['kd_loss']:.4g}, penalty {d['penalty']:.4g})"]
    for name, c in d["constraints"].items():
        parts.append(f"{name} {c['value']:.4g} {c['sense']} {c['threshold']:.4g} λ={c['multiplier']:.4g}")
    p = d["projection"]
    if p.get("tokens"):
        parts.append(f"relaxed {p['relaxed_tokens']}/{p['tokens']} corrected {p.get('corrected_tokens', 0)}")
    if d["alarms"]:
        parts.append(f"ALARMS: {[a['constraint'] for a in d['alarms']]}")
    return "; ".join(parts)


def read_step_log(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Iterate the records of a JSONL step log."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
