"""Render an :class:`AuditReport` as Markdown or as one self-contained HTML page, and write all three files."""
from __future__ import annotations

import html
import math
from pathlib import Path

from .plots import bounds_figure, trace_figure, weight_heatmaps
from .report import NOT_BOUNDED, PASS, AuditReport, ConstraintResult, format_confidence, save_json

__all__ = ["to_markdown", "to_html", "write_report"]


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _metric(x: float | int | None) -> str:
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else _f(x)


def _result(status: str) -> str:
    return status.upper()


def _slices_note(report: AuditReport) -> str:
    level = ("Bonferroni-corrected over the bounded slices of a constraint (the column holds jointly)"
             if report.slice_correction == "bonferroni" else "per slice (no multiplicity correction)")
    return (f"A slice is certified when its own bound meets the threshold; bounds are {level}. Small slices rarely "
            "certify, and slices with fewer units than the minimum are listed as not bounded (informational; the "
            "verdict is the constraint's).")


def _how(c: ConstraintResult) -> str:
    """Estimand, unit, support and what was used to bound it, in one line."""
    parts = [c.estimand, f"unit: {c.unit}", f"support: {c.support}"]
    if c.kind == "student":
        parts.append(f"tolerance {c.tolerance:g} (training only)")
        if c.train_threshold is not None and c.train_threshold != c.threshold:
            parts.append(f"train threshold {c.train_threshold:g}")
    if c.numerical_tolerance is not None:
        parts.append(f"round-off {c.numerical_tolerance:g}")
    if c.resamples is not None:
        parts.append(f"{c.resamples} resamples, seed {c.seed}")
    elif c.seed is not None:
        parts.append(f"unit order seed {c.seed}")
    if c.source:
        parts.append(c.source)
    return "; ".join(p for p in parts if p)


def to_markdown(report: AuditReport, max_slices: int = 5) -> str:
    """A short Markdown summary: verdict, metrics, constraint table, worst slices, teacher weights, provenance."""
    lines = [f"# safekd audit: {'PASS' if report.passed else 'FAIL'}", "", report.message, ""]
    if report.metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_metric(v)} |" for k, v in report.metrics.items()]
        lines.append("")
    lines += [f"## Constraints (one-sided bounds at {format_confidence(report.confidence)})", "",
              "| constraint | kind | estimate | bound | method | threshold | slack | n | result |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in report.constraints:
        res = _result(c.status) if c.status == PASS else f"**{_result(c.status)}**"
        lines.append(f"| `{c.name}` | {c.kind} | {_f(c.estimate)} | {_f(c.bound)} | {c.bound_method} | "
                     f"{c.direction} {_f(c.threshold)} | {_f(c.slack)} | {c.n} | {res} |")
    lines.append("")
    lines += [f"- `{c.name}`: {_how(c)}" for c in report.constraints]
    lines.append("")
    for c in report.constraints:
        shown = [s for s in c.slices if s.status != NOT_BOUNDED][:max_slices]
        small = [s for s in c.slices if s.status == NOT_BOUNDED]
        if shown or small:
            lines += [f"### Worst slices of `{c.name}`", "", _slices_note(report), ""]
        if shown:
            lines += ["| slice | n | estimate | bound | slack | certified |", "|---|---|---|---|---|---|"]
            for s in shown:
                lines.append(f"| {s.key}={s.value} | {s.n} | {_f(s.estimate)} | {_f(s.bound)} | {_f(s.slack)} | "
                             f"{'yes' if s.status == PASS else 'no'} |")
            lines.append("")
        if small:
            lines += ["Not bounded (n < min_slice): " + ", ".join(f"{s.key}={s.value} (n={s.n}, estimate "
                                                                   f"{_f(s.estimate)})" for s in small), ""]
    tw = report.teacher_weights
    if tw is not None:
        lines += ["## Teacher weights (mean over audit tokens)", "",
                  "| scale | " + " | ".join(tw.teachers) + " |", "|---|" + "---|" * len(tw.teachers)]
        for scale, w in tw.mean_weight.items():
            lines.append(f"| {scale} | " + " | ".join(_f(x, 3) for x in w) + " |")
        lines.append("")
        lines.append(f"Projection: {tw.corrected_tokens} of {tw.total_tokens} tokens corrected, "
                     f"{tw.relaxed_tokens} relaxed.")
        for name, frac in tw.active_fraction.items():
            lines.append(f"- `{name}` active on {frac:.1%} of tokens")
        lines.append("")
    p = report.provenance
    lines += ["## Provenance", "", f"- spec hash: `{p.get('spec_hash')}`", f"- student digest: `{p.get('student_digest')}`",
              f"- audit examples: {p.get('data_size')}", f"- seed: {p.get('seed')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items()), ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}
th{background:#f3f3f3}.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
img{max-width:100%}code{background:#f6f8fa;padding:0 3px}"""


def _verdict(status: bool | str) -> str:
    status = (PASS if status else "fail") if isinstance(status, bool) else status
    return f'<span class="{"pass" if status == PASS else "fail"}">{_result(status)}</span>'


def _img(b64: str | None, alt: str) -> str:
    return "" if b64 is None else f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def to_html(report: AuditReport, max_slices: int = 10) -> str:
    """One HTML page with every plot embedded as a base64 PNG (no external assets)."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>safekd audit: {'PASS' if report.passed else 'FAIL'}</title><style>{_CSS}</style></head><body>",
           f"<h1>safekd audit: {_verdict(report.passed)}</h1>", f"<p>{e(report.message)}</p>"]
    if report.metrics:
        out.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
        out += [f"<tr><td>{e(k)}</td><td>{_metric(v)}</td></tr>" for k, v in report.metrics.items()]
        out.append("</table>")
    out.append(f"<h2>Constraints (one-sided bounds at {format_confidence(report.confidence)})</h2>")
    out.append("<table><tr><th>constraint</th><th>kind</th><th>measure</th><th>estimate</th><th>bound</th>"
               "<th>method</th><th>threshold</th><th>slack</th><th>n</th><th>result</th></tr>")
    for c in report.constraints:
        out.append(f'<tr id="constraint-{e(c.name)}"><td><code>{e(c.name)}</code></td><td>{e(c.kind)}</td>'
                   f"<td>{e(c.measure)}</td><td>{_f(c.estimate)}</td><td>{_f(c.bound)}</td><td>{e(c.bound_method)}</td>"
                   f"<td>{e(c.direction)} {_f(c.threshold)}</td><td>{_f(c.slack)}</td><td>{c.n}</td>"
                   f"<td>{_verdict(c.status)}</td></tr>")
    out.append("</table><ul>")
    out += [f"<li><code>{e(c.name)}</code>: {e(_how(c))}</li>" for c in report.constraints]
    out.append("</ul>")
    out.append(_img(bounds_figure(report.constraints), "estimate, bound and threshold per constraint"))
    for c in report.constraints:
        shown = [s for s in c.slices if s.status != NOT_BOUNDED][:max_slices]
        small = [s for s in c.slices if s.status == NOT_BOUNDED]
        if shown or small:
            out.append(f"<h3>Worst slices of <code>{e(c.name)}</code></h3><p>{e(_slices_note(report))}</p>")
        if shown:
            out.append("<table><tr><th>slice</th><th>n</th><th>estimate</th><th>bound</th><th>slack</th>"
                       "<th>certified</th></tr>")
            for s in shown:
                out.append(f"<tr><td>{e(s.key)}={e(s.value)}</td><td>{s.n}</td><td>{_f(s.estimate)}</td><td>"
                           f"{_f(s.bound)}</td><td>{_f(s.slack)}</td><td>{'yes' if s.status == PASS else 'no'}</td></tr>")
            out.append("</table>")
        if small:
            out.append("<p>Not bounded (n &lt; min_slice): " + ", ".join(
                f"{e(s.key)}={e(s.value)} (n={s.n}, estimate {_f(s.estimate)})" for s in small) + "</p>")
    tw = report.teacher_weights
    if tw is not None:
        out.append("<h2>Teacher weights</h2><table><tr><th>scale</th>" + "".join(f"<th>{e(t)}</th>" for t in tw.teachers)
                   + "</tr>")
        for scale, w in tw.mean_weight.items():
            out.append(f"<tr><td>{e(scale)}</td>" + "".join(f"<td>{_f(x, 3)}</td>" for x in w) + "</tr>")
        out.append("</table>")
        out.append(f"<p>Projection corrected {tw.corrected_tokens} of {tw.total_tokens} tokens; "
                   f"{tw.relaxed_tokens} were relaxed (infeasible set).</p>")
        if tw.active_fraction:
            out.append("<table><tr><th>teacher-weight constraint</th><th>active on</th></tr>")
            out += [f"<tr><td><code>{e(k)}</code></td><td>{v:.1%}</td></tr>" for k, v in tw.active_fraction.items()]
            out.append("</table>")
        out.append(_img(weight_heatmaps(tw), "mean teacher weight by teacher and slice"))
    if report.traces:
        out.append("<h2>Training traces</h2>")
        out.append(_img(trace_figure(report.traces, report), "training traces"))
    p = report.provenance
    out.append("<h2>Provenance</h2><table>")
    for k in ("spec_hash", "student_digest", "data_size", "seed", "created"):
        out.append(f"<tr><td>{e(k)}</td><td><code>{e(str(p.get(k)))}</code></td></tr>")
    for k, v in p.get("versions", {}).items():
        out.append(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(x for x in out if x)


def write_report(report: AuditReport, out_dir: str | Path, stem: str = "report") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.html`` and ``<stem>.md`` into ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": save_json(report, out / f"{stem}.json"), "html": out / f"{stem}.html", "md": out / f"{stem}.md"}
    paths["html"].write_text(to_html(report), encoding="utf-8")
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    return paths
