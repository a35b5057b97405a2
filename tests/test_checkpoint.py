"""Checkpoints: atomic write, weights_only load, and bit-identical resume."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from safekd import constraints as C
from safekd.checkpoint import load_checkpoint, save_checkpoint
from safekd.distiller import SafeDistiller
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.weighting import ConfidenceSoftmax, TaskQuality

V, K, B, T = 16, 3, 2, 5
SPEC = Spec(teachers=[TeacherSpec("a", 0.9), TeacherSpec("b", 0.5), TeacherSpec("c", 0.1)],
            constraints=[C.cap("c", 0.3), C.unsafe_mass(0.2), C.unsafe_rate(0.02), C.retain("accuracy", 0.3)],
            unsafe=[0, 1], dual=DualSpec(rule="nupi", lr=0.2, kp=0.5, ema_nu=0.3, every=2),
            checks=ChecksSpec(reference_every=0, alarm_window=3))


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 12)
        self.drop = torch.nn.Dropout(0.3)
        self.out = torch.nn.Linear(12, V)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.emb(x))))


def _batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return {"inputs": torch.randint(0, V, (B, T), generator=g), "teacher_logits": 2 * torch.randn(B, T, K, V, generator=g),
            "labels": torch.randint(0, V, (B, T), generator=g), "task_ids": torch.tensor([0, 1])}


def _fresh(seed=0):
    torch.manual_seed(seed)
    student = Student()
    task = TaskQuality(num_tasks=2, num_teachers=K)
    task.update(torch.tensor([0, 1]), torch.rand(2, K))
    weighting = {"token": ConfidenceSoftmax(beta=2.0), "task": task}
    return SafeDistiller(student, None, torch.optim.Adam(student.parameters(), 1e-2), SPEC, weighting=weighting)


def _run(d, steps, start=0):
    for i in range(start, start + steps):
        d.step(_batch(i))
        torch.rand(1), np.random.rand(), random.random()  # user code consuming every RNG between steps


@pytest.mark.filterwarnings("ignore::safekd.distiller.MultiplierAlarm")
def test_resume_is_bit_identical(tmp_path):
    N = 5
    torch.manual_seed(123)
    ref = _fresh()
    _run(ref, 2 * N)

    torch.manual_seed(123)
    first = _fresh()
    _run(first, N)
    path = tmp_path / "ckpt" / "run.pt"
    save_checkpoint(path, first)
    assert path.exists() and not (tmp_path / "ckpt" / "run.pt.tmp").exists()
    torch.manual_seed(999), np.random.seed(7), random.seed(5)  # a new process would start elsewhere
    resumed = _fresh(seed=42)
    load_checkpoint(path, resumed)
    _run(resumed, N, start=N)

    for p, q in zip(ref.student.parameters(), resumed.student.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(ref.multipliers[n], resumed.multipliers[n]) for n in ref.multipliers)
    assert any(float(t) > 0 for t in ref.multipliers.values())
    assert ref.step_count == resumed.step_count == 2 * N
    assert torch.equal(ref.weighting["task"].loss_ema, resumed.weighting["task"].loss_ema)


@pytest.mark.filterwarnings("ignore::safekd.distiller.MultiplierAlarm")
def test_checkpoint_is_weights_only_and_checked(tmp_path):
    d = _fresh()
    _run(d, 1)
    path = tmp_path / "c.pt"
    d.save_checkpoint(str(path))
    payload = torch.load(path, weights_only=True)
    assert payload["distiller"]["spec"] == SPEC.to_dict() and payload["distiller"]["step"] == 1
    other = Spec(teachers=SPEC.teachers, constraints=[C.unsafe_rate(0.1)], unsafe=[0])
    torch.manual_seed(0)
    s = Student()
    with pytest.raises(ValueError, match="checkpoint constraints"):
        load_checkpoint(path, SafeDistiller(s, None, torch.optim.SGD(s.parameters(), 0.1), other))


FLAT_LAYOUT_FIXTURE = Path(__file__).parent / "data" / "checkpoint_v2_flat_layout.pt"


@pytest.mark.filterwarnings("ignore::safekd.distiller.MultiplierAlarm")
def test_checkpoint_written_with_the_flat_layout_loads():
    """A format-2 checkpoint written by the flat layout (``safekd.distiller``, before the layered packages): three
    steps of this file's SPEC and batches with an ``Embedding → Tanh → Linear`` student, ConfidenceSoftmax(β=2) and
    TaskQuality weighting, Adam(1e-2), seeds 123 then 0. It loads into today's modules and training goes on."""
    from safekd.training.checkpoint import FORMAT_VERSION, read_checkpoint

    payload = read_checkpoint(FLAT_LAYOUT_FIXTURE)
    assert payload["format_version"] == FORMAT_VERSION == 2
    assert payload["extra"]["written_by"].endswith("(before issue 18)")
    torch.manual_seed(7)
    student = torch.nn.Sequential(torch.nn.Embedding(V, 12), torch.nn.Tanh(), torch.nn.Linear(12, V))
    task = TaskQuality(num_tasks=2, num_teachers=K)
    task.update(torch.tensor([0, 1]), torch.rand(2, K))
    d = SafeDistiller(student, None, torch.optim.Adam(student.parameters(), 1e-2), SPEC,
                      weighting={"token": ConfidenceSoftmax(beta=2.0), "task": task})
    load_checkpoint(FLAT_LAYOUT_FIXTURE, d)
    assert d.step_count == 3
    for key, value in d.student.state_dict().items():
        assert torch.equal(value, payload["distiller"]["student"][key]), key
    for i in range(3, 5):
        d.step(_batch(i))
    assert d.step_count == 5 and all(torch.isfinite(p).all() for p in d.student.parameters())
