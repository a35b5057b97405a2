"""Bad input gives one clear line naming the culprit: exit code 2 on the command line, a documented exception in
Python; nothing is changed before the error."""
import errno
import os
import pickle
import shutil
from importlib import resources

import numpy as np
import pytest
import torch

import safekd
import solvers
from safekd import constraints as C
from safekd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from safekd.cli import CLIError, main

V = 5
SPEC = safekd.Spec(teachers=[safekd.TeacherSpec("a", 1.0), safekd.TeacherSpec("b", 0.5)],
                   constraints=[C.unsafe_rate(0.5)], unsafe=[0])


def _distiller(teachers=None):
    torch.manual_seed(0)
    student = torch.nn.Linear(3, V)
    lin = torch.nn.Linear(3, V)
    teachers = teachers or {"a": lin, "b": lin}
    return safekd.SafeDistiller(student, teachers, torch.optim.SGD(student.parameters(), lr=0.1), SPEC)


def _batch(n=4, labels=None):
    return {"inputs": torch.randn(n, 3), "labels": torch.zeros(n, dtype=torch.long) if labels is None else labels}


def _one_line(text: str) -> str:
    assert text.strip() and "\n" not in text.strip() and "Traceback" not in text, text
    return text.strip()


# ------------------------------------------------------------------------------------------------ checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _bad_checkpoints(tmp, good):
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "random": np.random.default_rng(0).bytes(4096)}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp / f"{name}.pt"
        paths[name].write_bytes(content)
    for name, obj in {"malicious": {"x": _Evil()}, "list": [1, 2, 3],
                      "missing_key": {"format_version": 1, "rng": {}}}.items():
        paths[name] = tmp / f"{name}.pt"
        torch.save(obj, paths[name])
    return paths


EXPECTED = {"truncated": "truncated or corrupt", "empty": "empty (0 bytes)", "random": "not a checkpoint",
            "malicious": "refuses to load", "list": "holds a list", "missing_key": "missing key 'distiller'"}


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    d = _distiller()
    d.step(_batch())
    save_checkpoint(tmp / "good.pt", d)
    return tmp, _bad_checkpoints(tmp, tmp / "good.pt")


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_checkpoint_python(bad_checkpoints, case):
    _, paths = bad_checkpoints
    d = _distiller()
    before = [p.detach().clone() for p in d.student.parameters()]
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(paths[case], d)
    msg = _one_line(str(exc.value))
    assert msg.startswith(str(paths[case])) and EXPECTED[case] in msg
    assert "weights_only=False" not in msg
    assert all(torch.equal(a, b) for a, b in zip(before, d.student.parameters()))  # nothing loaded
    assert d.step_count == 0


def test_any_tensor_file_names_itself(bad_checkpoints):
    from safekd.checkpoint import load_file

    _, paths = bad_checkpoints
    with pytest.raises(CheckpointError, match=r"truncated\.pt: the audit data is truncated or corrupt \(.*\); "
                                              r"save it with torch\.save$"):
        load_file(paths["truncated"], what="audit data", redo="save it with torch.save")
    assert load_file(paths["list"], what="audit data") == [1, 2, 3]


def test_checkpoint_missing_distiller_key_is_caught_before_loading(bad_checkpoints):
    tmp, _ = bad_checkpoints
    payload = torch.load(tmp / "good.pt", weights_only=True)
    del payload["distiller"]["meter"]
    torch.save(payload, tmp / "partial.pt")
    d = _distiller()
    before = [p.detach().clone() for p in d.student.parameters()]
    with pytest.raises(CheckpointError, match=r"partial\.pt: missing key 'distiller\.meter'"):
        load_checkpoint(tmp / "partial.pt", d)
    assert all(torch.equal(a, b) for a, b in zip(before, d.student.parameters()))


@pytest.fixture(scope="module")
def audit_job(tmp_path_factory):
    """The demo job spec and audit data that carry cached teacher logits (so no teacher is trained)."""
    tmp = tmp_path_factory.mktemp("cli_ckpt")
    spec = tmp / "job.yaml"
    shutil.copy(resources.files("safekd.data").joinpath("digits_demo.yaml"), spec)
    data = tmp / "heldout.pt"
    torch.save({"inputs": torch.randn(8, 64), "labels": torch.arange(8), "teacher_logits": torch.randn(8, 5, 10)},
               data)
    return spec, data


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_checkpoint_cli(bad_checkpoints, audit_job, case, capsys):
    _, paths = bad_checkpoints
    spec, data = audit_job
    code = main(["audit", "--spec", str(spec), "--checkpoint", str(paths[case]), "--data", str(data)])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and str(paths[case]) in err and EXPECTED[case] in err


def _full_disk_open(limit):
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, b):
            if self.written + len(b) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    return lambda path, mode="r", *a, **k: Full(real_open(path, mode, *a, **k))


def test_disk_full_names_the_path_and_keeps_the_old_checkpoint(tmp_path, monkeypatch, capsys):
    d = _distiller()
    d.step(_batch())
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, d)
    old = path.read_bytes()
    d.step(_batch())
    monkeypatch.setattr("safekd.checkpoint.open", _full_disk_open(2000), raising=False)
    with pytest.raises(OSError) as exc:
        save_checkpoint(path, d)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(path)
    assert "no space left on device" in str(exc.value)
    assert path.read_bytes() == old and not (tmp_path / "ckpt.pt.tmp").exists()
    # the command line renders it as one line (the job loader is replaced by the failing save)
    monkeypatch.setattr("safekd.jobs.load_job", lambda spec: save_checkpoint(path, d))
    assert main(["train", "--spec", "job.yaml"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err == f"safekd train: error: no space left on device: {path}; free some space or write elsewhere (--out)"


# ----------------------------------------------------------------------------------------------- command line
def test_bad_thread_count(monkeypatch, capsys):
    monkeypatch.setenv("SAFEKD_THREADS", "abc")
    assert main(["theory", "--list"]) == 2
    assert "SAFEKD_THREADS must be a whole number >= 1, got 'abc'" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, culprit", [
    (["check-axioms", "safekd.weighting:ConfidenceSoftmax", "--teachers", "0"], "--teachers: must be >= 1, got 0"),
    (["check-axioms", "safekd.weighting:ConfidenceSoftmax", "--arg", "beta"], "--arg: expected NAME=VALUE"),
    (["check-axioms", "safekd.weighting:SafetyPrior"], "missing 1 required positional argument: 'base'"),
    (["check-axioms", "safekd.pooling:linear_pool", "--arg", "beta=2"], "is not a class"),
])
def test_check_axioms_argument_errors(argv, culprit, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err.strip().splitlines()[-1] and "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(CLIError, match="missing 1 required positional argument: 'base'"):
        main(["check-axioms", "safekd.weighting:SafetyPrior", "--debug"])


# --------------------------------------------------------------------------------------------------- batches
def test_empty_batch():
    d = _distiller()
    with pytest.raises(ValueError, match=r"^batch\['inputs'\] is empty \(0 examples\)"):
        d.step(_batch(0))
    assert d.step_count == 0


@pytest.mark.parametrize("bad, kind, fix", [
    (lambda y: (y,), "tuple", "LogitsOf"),
    (lambda y: y.numpy(), "ndarray", "torch.from_numpy"),
])
def test_teacher_must_return_a_tensor(bad, kind, fix):
    lin = torch.nn.Linear(3, V)
    d = _distiller({"a": lin, "b": lambda x: bad(lin(x).detach())})
    with pytest.raises(TypeError) as exc:
        d.step(_batch())
    msg = _one_line(str(exc.value))
    assert msg.startswith(f"teacher 'b' returned a {kind}") and fix in msg


@pytest.mark.parametrize("label", [V, V + 7, -3])
def test_labels_outside_the_vocabulary(label):
    d = _distiller()
    before = [p.detach().clone() for p in d.student.parameters()]
    with pytest.raises(ValueError, match=rf"batch\['labels'\] holds {label} at index \(2,\): labels must be in "
                                          rf"\[0, V={V}\)"):
        d.step(_batch(labels=torch.tensor([0, 1, label, 2])))
    assert all(torch.equal(a, b) for a, b in zip(before, d.student.parameters()))


def test_ignored_labels_are_accepted():
    _distiller().step(_batch(labels=torch.tensor([0, -100, 4, -100])))


# ---------------------------------------------------------------------------------------------------- solvers
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's message")
def test_simplex_on_a_missing_device():
    with pytest.raises(ValueError, match=r"^device='cuda' is not usable with this torch build .*use device='cpu'"):
        solvers.FeasibleSet.simplex(3, device="cuda")
    with pytest.raises(ValueError, match=r"^device='cuda' is not usable"):
        solvers.FeasibleSet.simplex(3).to(device="cuda")


def test_feasible_set_rows_named_by_default():
    fs = solvers.FeasibleSet(torch.zeros(3), torch.ones(3), torch.eye(3)[:2], torch.tensor([0.5, 0.9]))
    assert fs.row_names == ("row[0]", "row[1]")
    w = solvers.project(torch.tensor([0.9, 0.05, 0.05]), fs)
    assert float(w[0]) == pytest.approx(0.5) and float(w.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"row_names must have length m=2 \(one name per row of A\), got 1"):
        solvers.FeasibleSet(torch.zeros(3), torch.ones(3), torch.ones(2, 3), torch.ones(2), ("only-one",))
