"""Adapters for training frameworks; each imports its framework only when used.

- :mod:`safekd.integrations.hf` — ``SafeKDTrainer``, a ``transformers.Trainer`` subclass (needs ``safekd[hf]``);
- :mod:`safekd.integrations.lightning` — ``SafeKDModule``, a ``LightningModule`` base/mix-in (needs ``safekd[lightning]``);
- :mod:`safekd.integrations.base` — the framework-neutral pieces both use (``LogitsOf``,
  ``record_metrics``, ``weighting_to``).

``import safekd`` and ``import safekd.integrations`` import neither framework; the attributes below are
resolved on first access.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SafeKDTrainer", "SafeKDModule"]

_HOMES = {"SafeKDTrainer": "hf", "SafeKDModule": "lightning"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'safekd.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
