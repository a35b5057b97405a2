"""Audit report: JSON schema validation, round trip, self-contained HTML (parsed) and Markdown."""
import json
from html.parser import HTMLParser

import jsonschema
import pytest

from safekd.auditing.bounds import clopper_pearson, empirical_bernstein
from safekd.auditing.render import to_html, to_markdown, write_report
from safekd.auditing.report import (
    SCHEMA_VERSION,
    AuditReport,
    ConstraintResult,
    SliceResult,
    TeacherWeightSummary,
    load_schema,
    validate_report_dict,
)


def _constraint(name, k, n, thr, kind="student"):
    b = clopper_pearson(k, n, 0.95)
    slices = [SliceResult("label", str(v), n // 2, b.estimate, b.value, thr - b.value, b.value <= thr, float(k // 2))
              for v in range(2)]
    return ConstraintResult(name=name, kind=kind, measure="unsafe_rate", direction="<=", threshold=thr,
                            estimate=b.estimate, bound=b.value, bound_method=b.method, confidence=0.95,
                            slack=thr - b.value, passed=b.value <= thr, n=n, count=float(k), slices=slices)


def _report():
    eb = empirical_bernstein([0.01, 0.02, 0.0, 0.05] * 50, 0.95)
    cons = [
        _constraint("fpr<forbidden>", 3, 500, 0.05),
        _constraint("fails & <tricky>", 40, 500, 0.05),
        ConstraintResult("target_unsafe_mass", "target", "unsafe_mass", "<=", 0.2, eb.estimate, eb.value, eb.method,
                         0.95, 0.2 - eb.value, eb.value <= 0.2, eb.n, eb.count),
    ]
    tw = TeacherWeightSummary(
        teachers=["logreg", "mlp", "biased"], mean_weight={"token": [0.3, 0.4, 0.3], "final": [0.35, 0.45, 0.2]},
        by_slice={"label": {"values": ["0", "1"], "mean_weight": [[0.3, 0.5, 0.2], [0.4, 0.4, 0.2]]}},
        active_fraction={"cap(biased)": 0.6}, relaxed_tokens=0, corrected_tokens=300, total_tokens=500)
    traces = {"step": [0, 1, 2], "series": {"loss/kd": [1.0, 0.8, 0.7], "residual/fpr<forbidden>": [0.1, None, -0.01],
                                            "multiplier/fpr<forbidden>": [0.0, 0.1, 0.1]}}
    prov = {"spec_hash": "a" * 64, "student_digest": "b" * 64, "data_size": 500, "seed": 0,
            "versions": {"safekd": "0.1.0"}, "created": "2026-01-01T00:00:00Z"}
    return AuditReport(passed=all(c.passed for c in cons), message="1 of 3 constraints fail", confidence=0.95,
                       constraints=cons, metrics={"accuracy": 0.95, "nan_metric": float("nan")}, provenance=prov,
                       teacher_weights=tw, traces=traces)


def test_json_validates_against_schema_and_round_trips():
    r = _report()
    d = json.loads(r.to_json())  # strict JSON: NaN became null
    assert d["schema_version"] == SCHEMA_VERSION == "2.0"
    assert d["metrics"]["nan_metric"] is None
    validate_report_dict(d)
    jsonschema.Draft202012Validator.check_schema(load_schema())
    back = AuditReport.from_dict(d)
    assert back.to_dict() == d
    assert [c.name for c in back.failed] == ["fails & <tricky>"]


def test_schema_rejects_malformed_reports():
    d = _report().to_dict()
    bad = json.loads(json.dumps(d))
    bad["constraints"][0]["direction"] = "<"
    with pytest.raises(jsonschema.ValidationError):
        validate_report_dict(bad)
    bad = json.loads(json.dumps(d))
    del bad["provenance"]["spec_hash"]
    with pytest.raises(jsonschema.ValidationError):
        validate_report_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["schema_version"] = "1.0"
    with pytest.raises(jsonschema.ValidationError):
        validate_report_dict(bad)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.imgs, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_names_every_constraint(tmp_path):
    r = _report()
    page = to_html(r)
    p = _Collect()
    p.feed(page)
    p.close()
    assert p.stack == []  # every tag closed
    text = "".join(p.text)
    for c in r.constraints:
        assert c.name in text
    assert "FAIL" in text and "clopper-pearson" in text and "empirical-bernstein" in text
    assert len(p.imgs) == 3  # bounds bars, weight heat-map, traces
    assert all(src.startswith("data:image/png;base64,") for src in p.imgs)
    assert "http://" not in page and "https://" not in page

    paths = write_report(r, tmp_path / "out")
    assert {k: v.exists() for k, v in paths.items()} == {"json": True, "html": True, "md": True}
    validate_report_dict(json.loads(paths["json"].read_text()))


def test_markdown_summary_lists_constraints_and_worst_slices():
    md = to_markdown(_report())
    assert md.startswith("# safekd audit: FAIL")
    for name in ("`fpr<forbidden>`", "`fails & <tricky>`", "`target_unsafe_mass`"):
        assert name in md
    assert "**FAIL**" in md and "label=0" in md and "cap(biased)" in md
