"""Render an :class:`AuditReport` as Markdown or as one self-contained HTML page, and write all three files."""
from __future__ import annotations

import html
import math
from pathlib import Path

from .plots import bounds_figure, trace_figure, weight_heatmaps
from .report import AuditReport, save_json

__all__ = ["to_markdown", "to_html", "write_report"]


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def to_markdown(report: AuditReport, max_slices: int = 5) -> str:
    """A short Markdown summary: verdict, metrics, constraint table, worst slices, teacher weights, provenance."""
    lines = [f"# safekd audit: {'PASS' if report.passed else 'FAIL'}", "", report.message, ""]
    if report.metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_f(v)} |" for k, v in report.metrics.items()]
        lines.append("")
    lines += [f"## Constraints (one-sided bounds at {report.confidence:.0%})", "",
              "| constraint | kind | estimate | bound | method | threshold | slack | n | result |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in report.constraints:
        lines.append(f"| `{c.name}` | {c.kind} | {_f(c.estimate)} | {_f(c.bound)} | {c.bound_method} | "
                     f"{c.direction} {_f(c.threshold)} | {_f(c.slack)} | {c.n} | {'PASS' if c.passed else '**FAIL**'} |")
    lines.append("")
    for c in report.constraints:
        if c.slices:
            lines += [f"### Worst slices of `{c.name}`", "", "| slice | n | estimate | bound | slack | certified |",
                      "|---|---|---|---|---|---|"]
            for s in c.slices[:max_slices]:
                lines.append(f"| {s.key}={s.value} | {s.n} | {_f(s.estimate)} | {_f(s.bound)} | {_f(s.slack)} | "
                             f"{'yes' if s.passed else 'no'} |")
            lines.append("")
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


def _verdict(ok: bool) -> str:
    return f'<span class="{"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>'


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
        out += [f"<tr><td>{e(k)}</td><td>{_f(v)}</td></tr>" for k, v in report.metrics.items()]
        out.append("</table>")
    out.append(f"<h2>Constraints (one-sided bounds at {report.confidence:.0%})</h2>")
    out.append("<table><tr><th>constraint</th><th>kind</th><th>measure</th><th>estimate</th><th>bound</th>"
               "<th>method</th><th>threshold</th><th>slack</th><th>n</th><th>result</th></tr>")
    for c in report.constraints:
        out.append(f'<tr id="constraint-{e(c.name)}"><td><code>{e(c.name)}</code></td><td>{e(c.kind)}</td>'
                   f"<td>{e(c.measure)}</td><td>{_f(c.estimate)}</td><td>{_f(c.bound)}</td><td>{e(c.bound_method)}</td>"
                   f"<td>{e(c.direction)} {_f(c.threshold)}</td><td>{_f(c.slack)}</td><td>{c.n}</td>"
                   f"<td>{_verdict(c.passed)}</td></tr>")
    out.append("</table>")
    out.append(_img(bounds_figure(report.constraints), "estimate, bound and threshold per constraint"))
    for c in report.constraints:
        if c.slices:
            out.append(f"<h3>Worst slices of <code>{e(c.name)}</code></h3><p>A slice is certified when its own "
                       "bound meets the threshold; small slices rarely are (informational; the verdict is the "
                       "constraint's).</p><table><tr><th>slice</th><th>n</th><th>estimate</th><th>bound</th>"
                       "<th>slack</th><th>certified</th></tr>")
            for s in c.slices[:max_slices]:
                out.append(f"<tr><td>{e(s.key)}={e(s.value)}</td><td>{s.n}</td><td>{_f(s.estimate)}</td>"
                           f"<td>{_f(s.bound)}</td><td>{_f(s.slack)}</td><td>{'yes' if s.passed else 'no'}</td></tr>")
            out.append("</table>")
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
