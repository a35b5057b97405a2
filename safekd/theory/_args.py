"""Argument validation shared by the harnesses: errors name the offending argument."""
from __future__ import annotations

import math


def positive_int(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ≥ ``minimum``; otherwise raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def in_range(name: str, value: float, low: float, high: float, *, closed_low: bool = True,
             closed_high: bool = True) -> float:
    """Return ``float(value)`` if finite and inside [low, high] (open ends on request); else ValueError."""
    v = float(value)
    ok = math.isfinite(v) and (v >= low if closed_low else v > low) and (v <= high if closed_high else v < high)
    if not ok:
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def seed_arg(seed: int) -> int:
    """Validate a random seed (non-negative int)."""
    return positive_int("seed", seed, minimum=0)
