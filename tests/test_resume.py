"""`safekd train --checkpoint-every N --resume`: a run killed with SIGKILL mid-training and resumed ends with the
same final checkpoint, byte for byte, and the same step log as an uninterrupted run; the training loop also takes an
iterable of batches."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safekd.cli import main
from safekd.jobs import load_job, prepare_data, train_student

TESTS = Path(__file__).parent
JOB = """\
job:
  data: constrained_toys:job_splits
  teachers: constrained_toys:job_teachers
  student: constrained_toys:job_student
  epochs: 12
  batch_size: 8
  lr: 0.05
  seed: 3
teachers: [{name: t}]
unsafe: {ids: [0]}
constraints:
  - {kind: unsafe_rate, max: 0.05}
dual: {rule: nupi, lr: 0.2, kp: 0.5, ema_nu: 0.3, every: 2}
checks: {reference_every: 0}
"""
STEPS = 12 * 8


@pytest.fixture()
def job_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # the job's factories live in tests/constrained_toys.py
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    return path


def _lines(path):
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical_to_an_uninterrupted_run(job_file, tmp_path):
    assert main(["train", "--spec", str(job_file), "--out", str(tmp_path / "ref"), "--no-progress"]) in (0, 1)

    run = tmp_path / "run"
    path = [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.Popen([sys.executable, "-m", "safekd", "train", "--spec", str(job_file), "--out", str(run),
                             "--checkpoint-every", "7", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _lines(run / "steps.jsonl") < 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    killed_at = _lines(run / "steps.jsonl")
    assert 30 <= killed_at < STEPS and not (run / "checkpoint.pt").exists()
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert len(kept) == 2 and kept[-1] <= f"step-{killed_at:08d}.pt"  # the last two, the newest before the kill
    # what a kill at a worse moment leaves: a half-written log line and a checkpoint's temporary file
    with open(run / "steps.jsonl", "a") as fh:
        fh.write('{"step": 99999, "loss": 0.')
    (run / "checkpoints" / "step-99999999.pt.tmp").write_bytes(b"PK\x03\x04 cut short")

    assert main(["train", "--spec", str(job_file), "--out", str(run), "--checkpoint-every", "7", "--resume",
                 "--no-progress"]) in (0, 1)
    assert (run / "checkpoint.pt").read_bytes() == (tmp_path / "ref" / "checkpoint.pt").read_bytes()
    ours, ref = (run / "steps.jsonl").read_text(), (tmp_path / "ref" / "steps.jsonl").read_text()
    assert [json.loads(x)["step"] for x in ours.splitlines()] == list(range(1, STEPS + 1))
    assert ours == ref  # appended from the checkpoint's step on: nothing lost, nothing twice


def test_an_iterable_of_batches_trains_like_the_same_batches_in_memory(job_file):
    job = load_job(job_file)
    train = prepare_data(job)["distill"]
    one_epoch = job.__class__(**{**job.__dict__, "epochs": 2})
    in_memory = train_student(one_epoch, train)
    g = torch.Generator().manual_seed(one_epoch.seed)
    batches = []
    for _ in range(one_epoch.epochs):  # what the in-memory walk draws, as a fixed list of batches
        perm = torch.randperm(64, generator=g)
        batches.append([{k: v[perm[s:s + 8]] for k, v in train.items()} for s in range(0, 64, 8)])

    class Epochs:  # yields epoch e's batches on its e-th pass: deterministic, as bit-exact resume requires
        def __init__(self):
            self.n = 0

        def __iter__(self):
            self.n += 1
            return iter(batches[self.n - 1])

    from_loader = train_student(one_epoch, Epochs())
    for p, q in zip(in_memory.student.parameters(), from_loader.student.parameters()):
        assert torch.equal(p, q)
    assert from_loader.step_count == in_memory.step_count == 16
