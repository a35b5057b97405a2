"""The `safekd` command line: --help everywhere, audit exit codes 0/1/2, train, theory, check-axioms."""
import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch

from safekd.cli import build_parser, main
from safekd.jobs import _make_distiller, load_job, prepare_data, resolve, run_training

SUBCOMMANDS = ["demo", "train", "validate", "audit", "cache-teachers", "check-axioms", "theory"]


@pytest.mark.parametrize("cmd", [None, *SUBCOMMANDS])
def test_help_on_every_subcommand(cmd, capsys):
    argv = ["--help"] if cmd is None else [cmd, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: safekd" + ("" if cmd is None else f" {cmd}"))
    if cmd is None:
        for sub in SUBCOMMANDS:
            assert sub in out


def test_parser_lists_exactly_the_subcommands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    """The demo job as a spec file, held-out data with cached teacher logits, a trained and a biased
    checkpoint (teachers are trained once for the module)."""
    tmp = tmp_path_factory.mktemp("cli")
    spec = tmp / "digits.yaml"
    shutil.copy(resources.files("safekd.data").joinpath("digits_demo.yaml"), spec)
    job = load_job(spec)
    splits = prepare_data(job)
    data = tmp / "heldout.pt"
    torch.save(splits["heldout"], data)
    trained = run_training(job, tmp / "trained", splits=splits)
    biased = resolve(job.student, "student")(seed=0)
    biased.load_state_dict(trained.distiller.student.state_dict())
    with torch.no_grad():
        biased[-1].bias[8] += 6.0  # a student that over-predicts the forbidden class 8
    _make_distiller(job, biased).save_checkpoint(str(tmp / "biased.pt"))
    return {"spec": spec, "data": data, "trained": trained, "biased": tmp / "biased.pt", "tmp": tmp}


def test_audit_exit_0_when_every_constraint_passes(job_files, capsys):
    f = job_files
    out = f["tmp"] / "audit0"
    code = main(["audit", "--spec", str(f["spec"]), "--checkpoint", str(f["trained"].checkpoint),
                 "--data", str(f["data"]), "--out", str(out), "--step-log", str(f["trained"].step_log)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "all 3 constraints pass" in stdout and "FAIL" not in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["traces"]["step"]
    # the audited student is the one that was trained
    assert report["provenance"]["student_digest"] == f["trained"].report.provenance["student_digest"]


def test_audit_exit_1_names_the_violated_constraint(job_files, capsys):
    f = job_files
    code = main(["audit", "--spec", str(f["spec"]), "--checkpoint", str(f["biased"]), "--data", str(f["data"]),
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    failed = [c["name"] for c in report["constraints"] if not c["passed"]]
    assert failed == ["forbidden_fpr"] and "forbidden_fpr" in report["message"]
    assert report["constraints"][2]["estimate"] > 0.04


def test_malformed_spec_exits_2_with_the_key(job_files, tmp_path, capsys):
    f = job_files
    bad = tmp_path / "bad.yaml"
    bad.write_text(f["spec"].read_text().replace("kind: cap,", "kind: capp,"))
    code = main(["audit", "--spec", str(bad), "--checkpoint", str(f["trained"].checkpoint)])
    err = capsys.readouterr().err
    assert code == 2
    assert "constraints[0].kind" in err and "capp" in err and err.count("\n") == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("teachers: [a, b\nconstraints: {")
    assert main(["train", "--spec", str(broken)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_missing_checkpoint_and_missing_cuda_exit_2(job_files, tmp_path, capsys):
    f = job_files
    missing = tmp_path / "nope.pt"
    assert main(["audit", "--spec", str(f["spec"]), "--checkpoint", str(missing), "--data", str(f["data"])]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "nope.pt" in err
    if not torch.cuda.is_available():
        code = main(["audit", "--spec", str(f["spec"]), "--checkpoint", str(f["trained"].checkpoint),
                     "--data", str(f["data"]), "--device", "cuda"])
        assert code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_train_writes_checkpoint_log_and_report(job_files, tmp_path, capsys):
    spec = tmp_path / "short.yaml"
    spec.write_text(job_files["spec"].read_text().replace("epochs: 40", "epochs: 2"))
    code = main(["train", "--spec", str(spec), "--out", str(tmp_path / "run")])
    stdout = capsys.readouterr().out
    assert code in (0, 1), stdout
    run = Path(tmp_path / "run")
    assert {"checkpoint.pt", "steps.jsonl", "report.json", "report.html", "report.md"} <= {p.name for p in run.iterdir()}
    assert len((run / "steps.jsonl").read_text().splitlines()) == 2 * 10  # 629 distill examples / 64 per batch
    assert "forbidden_fpr" in stdout and str(run / "checkpoint.pt") in stdout


def test_theory_and_check_axioms(capsys):
    assert main(["theory", "--list"]) == 0
    assert "convergence-convex" in capsys.readouterr().out
    assert main(["theory", "no-such-harness"]) == 2
    assert "safekd theory --list" in capsys.readouterr().err
    assert main(["check-axioms", "safekd.weighting:ConfidenceSoftmax", "--batch", "16"]) == 0
    assert "declared axioms hold" in capsys.readouterr().out
    assert main(["check-axioms", "no_such_module:thing"]) == 2
    assert "no_such_module" in capsys.readouterr().err


def test_resolve_returns_the_object_and_names_the_job_key_in_errors():
    from safekd.weighting import CAMKD

    assert resolve("safekd.weighting:CAMKD", "weighting") is CAMKD          # a class comes back uninstantiated
    with pytest.raises(ValueError, match=r"^job\.student: 'nope' is neither a built-in"):
        resolve("nope", "student")
    with pytest.raises(ValueError, match=r"^job\.data: cannot import module 'no_such_module_xyz'"):
        resolve("no_such_module_xyz:load", "data")
    with pytest.raises(ValueError, match=r"^job\.teachers: module 'safekd\.weighting' has no attribute 'CAMKD\.nope'"):
        resolve("safekd.weighting:CAMKD.nope", "teachers")
