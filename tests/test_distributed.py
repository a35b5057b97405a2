"""safekd.distributed: helpers on one process, and two gloo processes on CPU with uneven shards."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safekd import constraints as C
from safekd import distributed as sd
from safekd.distiller import SafeDistiller  # imported here so forked ranks inherit it instead of importing it twice
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.steplog import StepLog


def launch(world_size: int, fn, tmp_path: Path, *args) -> None:
    """Run ``fn(rank, world_size, out_dir, *args)`` in ``world_size`` gloo processes (file:// rendezvous).

    Fork is used where available: the children skip re-importing torch, which keeps two-process tests fast.
    Each rank reports through files in ``out_dir``; a failure in any rank fails the launch.
    """
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    init_file = tmp_path / "rendezvous"
    init_file.unlink(missing_ok=True)
    mp.start_processes(
        _entry, args=(world_size, str(init_file), fn, str(tmp_path), args), nprocs=world_size, join=True,
        start_method=method,
    )


def _entry(rank: int, world_size: int, init_file: str, fn, out_dir: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, Path(out_dir), *args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- single process


def test_single_process_helpers_are_identities() -> None:
    assert not sd.is_distributed()
    assert (sd.get_rank(), sd.get_world_size(), sd.is_rank_zero()) == (0, 1, True)
    t = torch.tensor([3.0, 7.0])
    assert sd.all_reduce_sums(t) is t
    sd.assert_identical_across_ranks("anything", t)
    s = torch.tensor(6.0, requires_grad=True)
    loss = sd.global_token_mean(s, 4)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert s.grad.item() == pytest.approx(0.25)
    assert sd.global_token_mean(s, 0).item() == 0.0
    assert sd.run_on_rank_zero(lambda a, b: a + b, 2, b=3) == 5


def test_token_mean_scale_is_world_over_count_and_zero_for_no_tokens() -> None:
    assert sd.token_mean_scale(torch.tensor(8.0, dtype=torch.float64), 4).item() == 0.5
    zero = sd.token_mean_scale(torch.tensor(0.0), 3)
    assert zero.item() == 0.0 and torch.isfinite(zero)


def test_shard_slice_partitions_exactly() -> None:
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            parts = [range(n)[sd.shard_slice(n, r, world)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        sd.shard_slice(5, 2, 2)
    with pytest.raises(ValueError, match="n must be"):
        sd.shard_slice(-1, 0, 1)


def test_all_reduce_sums_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="tensor"):
        sd.all_reduce_sums([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        sd.all_reduce_sums(torch.tensor([True]))


# ---------------------------------------------------------------- two gloo processes

N_ITEMS = 7  # split 4 / 3 between two ranks


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ITEMS, 5, generator=g, dtype=torch.float64)
    y = torch.randn(N_ITEMS, 2, generator=g, dtype=torch.float64)
    flags = torch.rand(N_ITEMS, generator=g) < 0.4
    return x, y, flags


def _helpers_worker(rank: int, world: int, out: Path) -> None:
    x, y, flags = _data()
    part = sd.shard_slice(N_ITEMS)
    # sums & counts: the reduced rate equals the single-process rate bit for bit
    stats = torch.stack([flags[part].double().sum(), torch.tensor(float(flags[part].numel()), dtype=torch.float64)])
    reduced = sd.all_reduce_sums(stats)
    result = {"reduced": reduced, "local": stats}

    # global token mean under DDP: gradients equal one process on the whole batch
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sq = (ddp(x[part]) - y[part]).pow(2).sum(-1)
    sd.global_token_mean(sq.sum(), sq.numel()).backward()
    result["grad"] = model.weight.grad.clone()

    # identical state passes; diverged state raises on every rank, naming the tensor and the rank
    sd.assert_identical_across_ranks("multipliers", torch.tensor([0.5, 1.0]))
    try:
        sd.assert_identical_across_ranks("multipliers", torch.tensor([0.5, 1.0 + rank * 1e-3]))
    except sd.DistributedDivergenceError as exc:
        result["divergence"] = str(exc)
    try:
        sd.assert_states_identical({"lam": torch.ones(3), "running_mean": torch.tensor([[0.25, 0.5], [1.0, rank]])})
    except sd.DistributedDivergenceError as exc:
        result["named_divergence"] = str(exc)
    try:
        sd.assert_identical_across_ranks("teacher_stats", torch.zeros(2 + rank))
    except sd.DistributedDivergenceError as exc:
        result["shape_divergence"] = str(exc)

    # rank-0 writing: once, visible to all after return; a rank-0 failure raises everywhere
    log = out / "log.txt"
    ret = sd.run_on_rank_zero(lambda: log.open("a").write(f"written by {sd.get_rank()}\n"), what="write log")
    result["ret"] = ret
    result["log_visible"] = log.read_text()

    def fail() -> None:
        raise OSError("disk full")

    try:
        sd.run_on_rank_zero(fail, what="save checkpoint")
    except Exception as exc:  # noqa: BLE001 - recorded for the parent's assertions
        result["failure"] = f"{type(exc).__name__}: {exc}"
    torch.save(result, out / f"rank{rank}.pt")


def test_two_process_helpers(tmp_path: Path) -> None:
    launch(2, _helpers_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    x, y, flags = _data()

    # uneven shards (4 and 3 items) and the reduced sums equal the single-process sums exactly
    assert (r0["local"][1].item(), r1["local"][1].item()) == (4.0, 3.0)
    whole = torch.stack([flags.double().sum(), torch.tensor(float(N_ITEMS), dtype=torch.float64)])
    for r in (r0, r1):
        assert torch.equal(r["reduced"], whole)
        assert (r["reduced"][0] / r["reduced"][1]).item() == (flags.double().sum() / N_ITEMS).item()
    # averaging per-rank rates would have been wrong on these shards
    mean_of_rates = ((r0["local"][0] / 4) + (r1["local"][0] / 3)) / 2
    assert mean_of_rates.item() != pytest.approx((flags.double().sum() / N_ITEMS).item())

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2).double()
    (model(x) - y).pow(2).sum(-1).mean().backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["grad"], model.weight.grad, rtol=1e-12, atol=1e-12)

    for r in (r0, r1):
        assert "'multipliers' diverged across ranks: ranks [1]" in r["divergence"]
        assert "'running_mean' diverged across ranks: ranks [1] differ from rank 0 (at flat index 3: rank 0 has " \
            "0.0, ranks hold [0.0, 1.0]" in r["named_divergence"]
        assert "'teacher_stats' has a different number of elements" in r["shape_divergence"]
        assert r["log_visible"] == "written by 0\n"
    assert r0["ret"] == len("written by 0\n") and r1["ret"] is None
    assert r0["failure"] == "OSError: disk full"
    assert r1["failure"] == "RuntimeError: save checkpoint failed on rank 0; see rank 0's traceback"


# ---------------------------------------------------------------- SafeDistiller under DDP

B_GLOBAL, SEQ, FEAT, V, STEPS = 7, 3, 5, 6, 3  # 7 sequences per global batch: 4 on rank 0, 3 on rank 1


def _distiller_setup(log_path: Path | None = None):
    spec = Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=[C.cap("risky", 0.2), C.unsafe_mass(0.3), C.unsafe_rate(0.02),
                             C.retain("accuracy", 0.9)],
                unsafe=[0, 1], dual=DualSpec(rule="gradient_ascent", lr=2.0),
                checks=ChecksSpec(reference_every=0, alarm_window=0))
    torch.manual_seed(0)
    student = torch.nn.Linear(FEAT, V).double()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    model = sd.wrap_ddp(student)
    log = StepLog(log_path, summary_every=0) if log_path is not None else None
    return SafeDistiller(model, None, opt, spec, log=log), student, log


def _global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        mask = torch.rand(B_GLOBAL, SEQ, generator=g) < 0.8
        mask[:, 0] = True
        out.append({"inputs": torch.randn(B_GLOBAL, SEQ, FEAT, generator=g, dtype=torch.float64),
                    "teacher_logits": 2 * torch.randn(B_GLOBAL, SEQ, 3, V, generator=g, dtype=torch.float64),
                    "labels": torch.randint(0, V, (B_GLOBAL, SEQ), generator=g),
                    "mask": mask})
    return out


def _run_distiller(out: Path, tag: str) -> None:
    """Train STEPS steps on this rank's shard of each global batch; save records, state and a checkpoint."""
    distiller, student, log = _distiller_setup(out / f"steps_{tag}.jsonl")
    records = []
    for batch in _global_batches():
        part = sd.shard_slice(B_GLOBAL)
        records.append(distiller.step({k: v[part] for k, v in batch.items()}).to_dict())
    log.close()
    multipliers = torch.stack([distiller.multipliers[n] for n in sorted(distiller.multipliers)])
    sd.assert_identical_across_ranks("multipliers", multipliers)
    distiller.save_checkpoint(str(out / f"ckpt_{tag}.pt"))
    torch.save({"records": records, "params": [p.detach().clone() for p in student.parameters()],
                "multipliers": multipliers, "tokens": int(sum(b["mask"][sd.shard_slice(B_GLOBAL)].sum()
                                                              for b in _global_batches()))},
               out / f"{tag}_rank{sd.get_rank()}.pt")


def _ddp_worker(rank: int, world: int, out: Path) -> None:
    _run_distiller(out, "ddp")


@pytest.fixture(scope="module")
def ddp_vs_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(2, _ddp_worker, out)
    _run_distiller(out, "single")
    return out


def test_ddp_constraint_values_and_multipliers_match_single_process(ddp_vs_single: Path) -> None:
    single = torch.load(ddp_vs_single / "single_rank0.pt")
    ranks = [torch.load(ddp_vs_single / f"ddp_rank{r}.pt") for r in range(2)]
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # uneven shards, in sequences and in unmasked tokens
    assert ranks[0]["tokens"] + ranks[1]["tokens"] == single["tokens"]
    for step, ref in enumerate(single["records"]):
        for r in ranks:
            got = r["records"][step]["constraints"]
            for name, c in ref["constraints"].items():
                assert got[name]["count"] == c["count"]
                # a rate of 0/1 outcomes is exact; a sum of probabilities is exact up to summation order
                if name.startswith("retain"):
                    assert got[name]["value"] == c["value"], (step, name)
                else:
                    assert got[name]["value"] == pytest.approx(c["value"], rel=1e-12, abs=1e-15), (step, name)
        # every rank records the global token mean (one all-reduce carries the KD sum and count with the
        # constraints'), so the records agree with one process on the whole batch
        shares = [r["records"][step]["kd_loss"] for r in ranks]
        assert sum(shares) / 2 == pytest.approx(ref["kd_loss"], rel=1e-12)
        for r in ranks:
            got = r["records"][step]
            assert got["kd_loss"] == pytest.approx(ref["kd_loss"], rel=1e-12)
            assert got["penalty"] == pytest.approx(ref["penalty"], rel=1e-10, abs=1e-14)
            assert got["loss"] == pytest.approx(got["kd_loss"] + got["penalty"], rel=1e-12)
    assert bool((single["multipliers"] > 0).all())  # the dual step moved every multiplier
    for r in ranks:
        torch.testing.assert_close(r["multipliers"], single["multipliers"], rtol=1e-12, atol=1e-14)
        for p, q in zip(r["params"], single["params"]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_ddp_writes_checkpoint_and_step_log_once_and_loads_on_one_process(ddp_vs_single: Path) -> None:
    lines = (ddp_vs_single / "steps_ddp.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))
    assert not list(ddp_vs_single.glob("*.tmp"))
    distiller, student, _ = _distiller_setup()
    distiller.load_checkpoint(str(ddp_vs_single / "ckpt_ddp.pt"))
    single = torch.load(ddp_vs_single / "single_rank0.pt")
    assert distiller.step_count == STEPS
    for p, q in zip(student.parameters(), single["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
    for n, t in distiller.multipliers.items():
        torch.testing.assert_close(t, single["multipliers"][sorted(distiller.multipliers).index(n)])
