"""SafeKDModule: a tiny token-level student trained by lightning.Trainer on CPU, then audited."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from safekd import constraints as C  # noqa: E402
from safekd.auditing import audit, write_report  # noqa: E402
from safekd.integrations.lightning import SafeKDModule  # noqa: E402
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec  # noqa: E402

VOCAB, LENGTH, N, CAP = 12, 5, 24, 0.2


def tiny_lm(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Tanh(), torch.nn.Linear(8, VOCAB))


class Distil(SafeKDModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=0.5)


def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"inputs": torch.randint(0, VOCAB, (N, LENGTH), generator=g),
            "labels": torch.randint(2, VOCAB, (N, LENGTH), generator=g)}


def test_lightning_module_trains_respects_cap_logs_and_audits(tmp_path: Path) -> None:
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=[C.cap("risky", CAP), C.unsafe_rate(0.01)], unsafe=[0, 1],
                dual=DualSpec(rule="gradient_ascent", lr=5.0), checks=ChecksSpec(reference_every=0, alarm_window=0))
    teachers = {name: tiny_lm(seed) for name, seed in (("safe", 1), ("mid", 2), ("risky", 3))}
    module = Distil(tiny_lm(0), teachers, spec)
    before = [p.detach().clone() for p in module.student.parameters()]
    d = data()
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in d.items()} for i in range(N)], batch_size=6)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path), name="csv"),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)

    assert module.distiller.step_count == 3
    assert any(not torch.equal(p, q) for p, q in zip(module.student.parameters(), before))
    assert "teachers.safe.0.weight" not in module.state_dict()  # teachers stay out of Lightning checkpoints

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("safekd/weight/risky")]
    assert len(rows) == 3
    for r in rows:
        assert float(r["safekd/weight/risky"]) <= CAP + 1e-6  # the cap holds after projection ...
        assert float(r["safekd/weight_composed/risky"]) > CAP + 0.05  # ... and was binding before it
    multipliers = [float(r["safekd/unsafe_rate/multiplier"]) for r in rows]
    assert multipliers[0] > 0 and multipliers == sorted(multipliers)  # violated (≈2/12 > 1%): λ keeps rising

    report = audit(module.student, d, spec, teachers=teachers, distiller=module.distiller, seed=0)
    paths = write_report(report, tmp_path / "audit")
    saved = json.loads(paths["json"].read_text())
    assert {c["name"] for c in saved["constraints"]} == {"cap(risky)", "unsafe_rate"}
    assert report.constraint("cap(risky)").passed
