"""A student sharded with FSDP (``torch.distributed.fsdp.fully_shard``) on two gloo processes trains like one process:
same parameters, multipliers and constraint measurements, from dense and from sparse top-k teacher batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from safekd import constraints as C
from safekd import distributed as sd
from safekd.distiller import SafeDistiller
from safekd.sparse import topk_logprobs
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.unsafe import UnsafeSet

from test_distributed import B_GLOBAL, FEAT, V, _global_batches, launch

fsdp = pytest.importorskip("torch.distributed.fsdp")


def _setup(sharded: bool) -> tuple[SafeDistiller, torch.nn.Module]:
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=[C.cap("risky", 0.2), C.unsafe_mass(0.3), C.unsafe_rate(0.02), C.retain("accuracy", 0.9)],
                unsafe=[0, 1], dual=DualSpec(rule="gradient_ascent", lr=2.0),
                checks=ChecksSpec(reference_every=0, alarm_window=0))
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(FEAT, 8), torch.nn.Tanh(), torch.nn.Linear(8, V)).double()
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fsdp.fully_shard(student[0], mesh=mesh)
        fsdp.fully_shard(student, mesh=mesh)
    return SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.5), spec), student


def _run(out: Path, tag: str) -> None:
    d, student = _setup(tag == "fsdp")
    records = []
    for i, batch in enumerate(_global_batches()):
        if i % 2:  # every other step reads a sparse top-k cache of the same teachers
            logits = batch.pop("teacher_logits")
            batch.update(topk_logprobs(logits, 3, UnsafeSet([0, 1])))
        part = sd.shard_slice(B_GLOBAL)
        records.append(d.step({k: v[part] for k, v in batch.items()}).to_dict())
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in student.parameters()]
    torch.save({"records": records, "params": [p.detach().clone() for p in params],
                "multipliers": {n: t.clone() for n, t in d.multipliers.items()}}, out / f"{tag}_rank{sd.get_rank()}.pt")


def _worker(rank: int, world: int, out: Path) -> None:
    _run(out, "fsdp")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp_student_trains_like_one_process(tmp_path: Path) -> None:
    launch(2, _worker, tmp_path)
    _run(tmp_path, "single")
    single = torch.load(tmp_path / "single_rank0.pt")
    for r in range(2):
        got = torch.load(tmp_path / f"fsdp_rank{r}.pt")
        for step, ref in enumerate(single["records"]):
            for name, c in ref["constraints"].items():
                assert got["records"][step]["constraints"][name]["count"] == c["count"]
                assert got["records"][step]["constraints"][name]["value"] == pytest.approx(c["value"], rel=1e-12,
                                                                                             abs=1e-15)
            assert got["records"][step]["kd_loss"] == pytest.approx(ref["kd_loss"], rel=1e-12)
        for n, t in single["multipliers"].items():
            assert float(t) > 0
            torch.testing.assert_close(got["multipliers"][n], t, rtol=1e-12, atol=1e-14)
        for p, q in zip(got["params"], single["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
