"""A student sharded with FSDP (``torch.distributed.fsdp.fully_shard``) on two gloo processes trains like one process:
same parameters, multipliers and constraint measurements, from dense and from sparse top-k teacher batches; its
checkpoints hold full tensors, resume bit-identically on two processes and load on one (and back)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from safekd import constraints as C
from safekd import distributed as sd
from safekd.checkpoint import read_checkpoint
from safekd.distiller import SafeDistiller
from safekd.sparse import topk_logprobs
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.unsafe import UnsafeSet

from test_distributed import B_GLOBAL, FEAT, STEPS, V, _global_batches, launch

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
    return SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.5), spec), student


def _run(out: Path, tag: str, resume: Path | None = None) -> None:
    """Train (on this rank's shards; the student sharded unless ``tag`` is "single"), from ``resume`` if given, saving
    a checkpoint mid-way (uninterrupted runs) and at the end; save records, full parameters and multipliers."""
    d, student = _setup(tag != "single")
    if resume is not None:
        d.load_checkpoint(str(resume))
    records = []
    for i, batch in enumerate(_global_batches()):
        if i < d.step_count:
            continue
        if i % 2:  # every other step reads a sparse top-k cache of the same teachers
            logits = batch.pop("teacher_logits")
            batch.update(topk_logprobs(logits, 3, UnsafeSet([0, 1])))
        part = sd.shard_slice(B_GLOBAL)
        records.append(d.step({k: v[part] for k, v in batch.items()}).to_dict())
        if resume is None and d.step_count == STEPS // 2:
            d.save_checkpoint(str(out / f"mid_{tag}.pt"))
    d.save_checkpoint(str(out / f"ckpt_{tag}.pt"))
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in student.parameters()]
    torch.save({"records": records, "params": [p.detach().clone() for p in params],
                "multipliers": {n: t.clone() for n, t in d.multipliers.items()}}, out / f"{tag}_rank{sd.get_rank()}.pt")


def _worker(rank: int, world: int, out: Path) -> None:
    _run(out, "fsdp")
    sd.barrier()  # rank 0 has written mid_fsdp.pt
    _run(out, "resumed", resume=out / "mid_fsdp.pt")
    _run(out, "from_single", resume=out / "mid_single.pt")  # a one-process checkpoint, re-sharded


@pytest.fixture(scope="module")
def fsdp_vs_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _run(out, "single")
    launch(2, _worker, out)
    return out


def test_fsdp_student_trains_like_one_process(fsdp_vs_single: Path) -> None:
    single = torch.load(fsdp_vs_single / "single_rank0.pt")
    for r in range(2):
        got = torch.load(fsdp_vs_single / f"fsdp_rank{r}.pt")
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


def test_fsdp_run_resumed_from_its_checkpoint_is_bit_identical(fsdp_vs_single: Path) -> None:
    for r in range(2):
        full, resumed = (torch.load(fsdp_vs_single / f"{tag}_rank{r}.pt") for tag in ("fsdp", "resumed"))
        assert len(resumed["records"]) == STEPS - STEPS // 2
        assert resumed["records"] == full["records"][STEPS // 2:]
        for p, q in zip(resumed["params"], full["params"]):
            assert torch.equal(p, q)
        for n, t in full["multipliers"].items():
            assert torch.equal(resumed["multipliers"][n], t)
    a, b = (read_checkpoint(fsdp_vs_single / f"ckpt_{tag}.pt")["distiller"] for tag in ("fsdp", "resumed"))
    for k in ("student", "optimizer"):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_one_process_checkpoint_resumes_on_fsdp_ranks(fsdp_vs_single: Path) -> None:
    single = torch.load(fsdp_vs_single / "single_rank0.pt")
    for r in range(2):
        got = torch.load(fsdp_vs_single / f"from_single_rank{r}.pt")
        for p, q in zip(got["params"], single["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
        for n, t in single["multipliers"].items():
            torch.testing.assert_close(got["multipliers"][n], t, rtol=1e-10, atol=1e-10)


def test_fsdp_checkpoint_holds_full_tensors_and_loads_on_one_process(fsdp_vs_single: Path) -> None:
    ref = read_checkpoint(fsdp_vs_single / "ckpt_single.pt")["distiller"]
    got = read_checkpoint(fsdp_vs_single / "ckpt_fsdp.pt")["distiller"]
    assert all(type(t) is torch.Tensor for t in got["student"].values())
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    assert len(got["optimizer"]["state"]) == len(got["student"])  # a momentum buffer per parameter
    for k in ("student", "optimizer", "multipliers"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-10)
    d, student = _setup(False)
    d.load_checkpoint(str(fsdp_vs_single / "ckpt_fsdp.pt"))
    single = torch.load(fsdp_vs_single / "single_rank0.pt")
    assert d.step_count == STEPS
    for p, q in zip(student.parameters(), single["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-10)
    for n, t in single["multipliers"].items():
        torch.testing.assert_close(d.multipliers[n], t, rtol=1e-10, atol=1e-10)
