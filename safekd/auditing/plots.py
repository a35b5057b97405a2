"""Matplotlib figures for the HTML report, returned as base64 PNG strings (``Figure`` objects rendered by Agg:
no pyplot state, no backend switch, no files, no display)."""
from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from safekd.auditing.report import AuditReport, ConstraintResult, TeacherWeightSummary, format_confidence

__all__ = ["bounds_figure", "weight_heatmaps", "trace_figure"]


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bounds_figure(constraints: list[ConstraintResult]) -> str | None:
    """Per constraint: the estimate (bar), the confidence bound (whisker) and the threshold (red tick)."""
    if not constraints:
        return None
    fig = Figure(figsize=(2.6 * len(constraints) + 0.5, 3.0))
    axes = fig.subplots(1, len(constraints), squeeze=False)
    for ax, c in zip(axes[0], constraints):
        est = c.estimate if math.isfinite(c.estimate) else 0.0
        bnd = c.bound if math.isfinite(c.bound) else est
        colour = "tab:green" if c.passed else "tab:red"
        ax.bar([0], [est], color=colour, alpha=0.6, width=0.5, label="estimate")
        ax.errorbar([0], [est], yerr=[[max(est - bnd, 0.0)], [max(bnd - est, 0.0)]], fmt="none", ecolor="k",
                    capsize=8, label=f"{format_confidence(c.confidence)} bound")
        ax.axhline(c.threshold, color="tab:red", linestyle="--", label="threshold")
        top = max(est, bnd, c.threshold)
        ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
        ax.set_xticks([])
        ax.set_title(f"{c.name}\n{'PASS' if c.passed else 'FAIL'}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="upper left")
    return _png(fig)


def weight_heatmaps(tw: TeacherWeightSummary) -> str | None:
    """One heat-map per slice key: mean final teacher weight, teachers × slice values."""
    keys = [k for k, v in tw.by_slice.items() if v["values"]]
    if not keys:
        return None
    fig = Figure(figsize=(max(4.0, 0.5 * sum(len(tw.by_slice[k]["values"]) for k in keys) + 3),
                          0.45 * len(tw.teachers) + 1.8))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        m = np.asarray(tw.by_slice[key]["mean_weight"], dtype=float).T  # [K, slices]
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, float(m.max())))
        ax.set_yticks(range(len(tw.teachers)), tw.teachers, fontsize=8)
        ax.set_xticks(range(len(tw.by_slice[key]["values"])), tw.by_slice[key]["values"], fontsize=7)
        ax.set_xlabel(key)
        fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def _trace_panels(series: dict[str, list[Any]], report: AuditReport) -> list[tuple[str, list[str], float | None]]:
    """(title, series names, threshold) per panel: losses, one per student constraint, multipliers, projected
    teacher weights, projection events. Logs without these keys fall back to one panel per top-level group."""
    panels: list[tuple[str, list[str], float | None]] = []
    losses = [n for n in ("loss", "kd_loss", "penalty") if n in series]
    if losses:
        panels.append(("losses", losses, None))
    for c in report.constraints:
        key = f"constraints/{c.name}/value"
        if key in series:
            panels.append((f"{c.name} (training batches)", [key], c.threshold))
    mult = [n for n in series if n.startswith("constraints/") and n.endswith("/multiplier")]
    if mult:
        panels.append(("multipliers λ", mult, None))
    weights = [n for n in series if n.startswith("weights/projected/")]
    if weights:
        panels.append(("teacher weights (projected, batch mean)", weights, None))
    proj = [n for n in series if n.startswith("projection/") and
            (n.endswith("relaxed_tokens") or n.endswith("corrected_tokens") or n.startswith("projection/active/"))]
    if proj:
        panels.append(("projection events (tokens per batch)", proj, None))
    if not panels:
        groups: dict[str, list[str]] = {}
        for name in series:
            groups.setdefault(name.split("/", 1)[0], []).append(name)
        panels = [(g, names, None) for g, names in groups.items()]
    return panels


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if y.size < 2 * window or np.isnan(y).any():
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def trace_figure(traces: dict[str, Any], report: AuditReport) -> str | None:
    """Training traces: losses, each student constraint's batch value (and a moving average) against its
    threshold, the multipliers, the projected teacher weights and the projection events over steps."""
    steps = traces.get("step") or []
    series = traces.get("series") or {}
    if not steps or not series:
        return None
    panels = _trace_panels(series, report)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.4 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    window = max(1, len(steps) // 40)
    for ax, (title, names, threshold) in zip(axes.flat, panels):
        for name in names[:12]:
            y = np.array([np.nan if v is None else v for v in series[name]], dtype=float)
            x = steps[: len(y)]
            label = name.rsplit("/", 1)[-1] if not name.startswith("constraints/") else name.split("/")[1]
            if threshold is not None:
                ax.plot(x, y, lw=0.6, alpha=0.35, color="tab:blue", label="batch")
                ax.plot(x, _smooth(y, window), lw=1.4, color="tab:blue", label=f"moving avg ({window})")
            else:
                ax.plot(x, y, lw=1.0, label=label)
        if threshold is not None:
            ax.axhline(threshold, ls="--", lw=1.0, color="tab:red", label="threshold")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if len(names) > 1 or threshold is not None:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)
