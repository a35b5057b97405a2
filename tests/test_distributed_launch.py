"""`torchrun --nproc_per_node=2 -m safekd train --spec …` on CPU (gloo) against the same job on one process.

The job's data, teachers and student come from the small factories below (``module:function`` references;
the launched processes find this module through PYTHONPATH).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

N_TRAIN, N_AUDIT, FEAT, CLASSES, BATCH = 31, 20, 4, 3, 7  # global batches of 7 rows: 4 on rank 0, 3 on rank 1

JOB = f"""
job:
  data: test_distributed_launch:splits
  teachers: test_distributed_launch:teachers
  student: test_distributed_launch:student
  train_split: train
  audit_split: audit
  epochs: 2
  batch_size: {BATCH}
  lr: 0.3
  seed: 0
teachers:
  - {{name: safe, safety: 0.9}}
  - {{name: mid, safety: 0.5}}
  - {{name: risky, safety: 0.1}}
unsafe: {{ids: [0]}}
constraints:
  - {{kind: cap, teacher: risky, max: 0.2}}
  - {{kind: unsafe_rate, max: 0.3}}
  - {{kind: retain, metric: accuracy, min: 0.99}}
dual: {{rule: gradient_ascent, lr: 1.0}}
checks: {{reference_every: 0, alarm_window: 0}}
"""


def splits(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in (("train", N_TRAIN), ("audit", N_AUDIT)):
        out[name] = {"inputs": torch.randn(n, FEAT, generator=g), "labels": torch.randint(0, CLASSES, (n,), generator=g)}
    return out


def teachers(splits: dict, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    weights = {name: torch.randn(FEAT, CLASSES, generator=g).to(device) for name in ("safe", "mid", "risky")}
    return {name: (lambda x, w=w: x @ w) for name, w in weights.items()}


def student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(FEAT, CLASSES)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed next to this Python")
def test_torchrun_train_matches_one_process(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(JOB)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = _run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "safekd", "train", "--spec", str(spec),
                "--out", str(tmp_path / "two"), "--no-progress"], tmp_path)
    # retain(accuracy) >= 0.99 is out of reach on purpose (its multiplier must move), so the audit fails: exit 1
    assert two.returncode == 1, two.stderr[-3000:]
    one = _run([sys.executable, "-m", "safekd", "train", "--spec", str(spec), "--out", str(tmp_path / "one"),
                "--no-progress"], tmp_path)
    assert one.returncode == 1, one.stderr[-3000:]
    assert two.stdout.count("checkpoint:") == 1  # only rank 0 prints the report

    steps = 2 * -(-N_TRAIN // BATCH)
    logs = {}
    for run in ("one", "two"):
        lines = (tmp_path / run / "steps.jsonl").read_text().splitlines()
        logs[run] = [json.loads(x) for x in lines]
        assert [r["step"] for r in logs[run]] == list(range(1, steps + 1))  # written once, by rank 0
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert [c["name"] for c in report["constraints"] if not c["passed"]] == ["unsafe_rate", "retain(accuracy)"]
    for a, b in zip(logs["one"], logs["two"]):
        for name in ("unsafe_rate", "retain(accuracy)"):
            ca, cb = a["constraints"][name], b["constraints"][name]
            assert cb["count"] == ca["count"]
            assert cb["value"] == pytest.approx(ca["value"], rel=1e-5, abs=1e-7)
            assert cb["multiplier"] == pytest.approx(ca["multiplier"], rel=1e-5, abs=1e-7)
        assert b["weights"]["projected"]["risky"] <= 0.2 + 1e-6
    assert logs["one"][-1]["constraints"]["retain(accuracy)"]["multiplier"] > 0

    ckpts = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["distiller"] for run in ("one", "two")]
    assert set(ckpts[1]["student"]) == {"weight", "bias"}  # no DDP "module." prefix: loads on any world size
    for k in ("weight", "bias"):
        torch.testing.assert_close(ckpts[1]["student"][k], ckpts[0]["student"][k], rtol=1e-5, atol=1e-6)
