"""`safekd demo`, the main job, run in full: every constraint passes at 95% on held-out digits and the constrained
student's accuracy is within 2 points of the unconstrained one."""
import json
import time
from html.parser import HTMLParser

import pytest

from safekd.auditing import validate_report_dict
from safekd.cli import main


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.chunks, self.images = [], 0

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"

    def handle_data(self, data):
        self.chunks.append(data)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "safekd-demo"
    t0 = time.perf_counter()
    code = main(["demo", "--out", str(out), "--no-progress"])
    return code, out, time.perf_counter() - t0


def test_demo_passes_every_constraint_and_keeps_accuracy(demo_run, capsys):
    code, out, seconds = demo_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    validate_report_dict(report)
    assert report["passed"] and report["confidence"] == 0.95
    assert {c["name"] for c in report["constraints"]} == {"cap(biased)", "target_unsafe_mass", "forbidden_fpr"}
    assert all(c["passed"] for c in report["constraints"])
    fpr = next(c for c in report["constraints"] if c["name"] == "forbidden_fpr")
    assert fpr["bound_method"] == "clopper-pearson" and fpr["bound"] <= fpr["threshold"]
    m = report["metrics"]
    assert m["accuracy"] >= m["baseline_accuracy"] - 0.02
    assert m["accuracy"] > 0.9
    # the biased teacher is held under its cap and the unconstrained baseline is the one that misbehaves
    tw = report["teacher_weights"]
    assert tw["mean_weight"]["final"][tw["teachers"].index("biased")] <= 0.05 + 1e-6
    assert m["baseline_forbidden_fpr_bound"] > fpr["threshold"]
    assert seconds < 60


def test_demo_writes_a_self_contained_report(demo_run):
    _, out, _ = demo_run
    assert {"report.json", "report.html", "report.md", "checkpoint.pt", "steps.jsonl"} <= {p.name for p in out.iterdir()}
    page = (out / "report.html").read_text()
    p = _Text()
    p.feed(page)
    text = "".join(p.chunks)
    for name in ("cap(biased)", "target_unsafe_mass", "forbidden_fpr", "logreg", "biased"):
        assert name in text
    assert p.images == 3 and "src=\"http" not in page
    md = (out / "report.md").read_text()
    assert md.startswith("# safekd audit: PASS") and "clopper-pearson" in md
    assert (out / "baseline" / "report.json").exists()


def test_example_spec_is_the_demo_job():
    from dataclasses import replace
    from pathlib import Path

    from safekd.demo import demo_job
    from safekd.jobs import load_job

    example = load_job(Path(__file__).parents[1] / "examples" / "digits_spec.yaml")
    embedded = demo_job()
    assert example.spec.to_dict() == embedded.spec.to_dict()
    assert replace(example, out=embedded.out, source=None) == replace(embedded, source=None)


def test_quickstart_example_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(epochs=1, out=str(tmp_path / "qs"))
    out = capsys.readouterr().out
    assert "forbidden_fpr" in out and "cap(biased)" in out
    assert json.loads((tmp_path / "qs" / "report.json").read_text())["schema_version"] == "2.0"
