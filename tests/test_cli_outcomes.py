"""Every command-line outcome is coherent: the headline, the per-item lines and the exit code agree."""
import importlib
import json
import sys
from pathlib import Path

from safekd.cli import main


def test_check_axioms_headline_agrees_with_lines_and_exit_code(capsys):
    assert main(["check-axioms", "safekd.pooling:GeometricPool", "--batch", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    head, lines = out[0], [ln for ln in out if ln.startswith("  [")]
    assert head.startswith("geometric: all 8 declared axioms hold; 2 property(ies) it does not declare do not hold")
    assert "hull_membership" in head and "positivity_any" in head
    assert not any("[FAIL]" in ln for ln in lines)  # a FAIL line always means a declared axiom failed
    assert sum("[ no ]" in ln for ln in lines) == 2 and sum("[PASS]" in ln for ln in lines) == 8
    assert "paper-spec" not in "\n".join(out)


def test_check_axioms_constructor_arguments(capsys):
    argv = ["check-axioms", "safekd.weighting:SafetyPrior", "--batch", "8", "--teachers", "3", "--json",
            "--arg", "base={object: 'safekd.weighting:ConfidenceSoftmax', beta: 4.0}", "--arg", "gamma=0.5"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["subject"] == "SafetyPrior" and report["passed"]
    assert {r["tag"] for r in report["results"]} == {"reconstruction"}
    assert main(["check-axioms", "safekd.weighting:SafetyPrior", "--batch", "8",
                 "--arg", "base=safekd.weighting:EntropySoftmax"]) == 0


def test_fortunes_examples_exit_1_on_a_failed_constraint(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    fd = importlib.import_module("fortunes_data")
    ok = {"uniform": {"constraints": {}}, "safekd_constrained": {"constraints": {"unsafe_rate": {"passed": True}}}}
    assert fd.report_failures(ok) == 0 and capsys.readouterr().out == ""
    ok["safekd_constrained"]["constraints"]["cap"] = {"passed": False}
    assert fd.report_failures(ok) == 1
    assert capsys.readouterr().out == "FAIL safekd_constrained: cap\n"
