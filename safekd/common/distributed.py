"""torch.distributed helpers: exact sum/count reductions, cross-rank identity checks, rank-0 side effects.

Everything here is a no-op on a single process (``torch.distributed`` unavailable or not initialised), so
library code calls these helpers unconditionally. Rules the rest of safekd follows under DDP:

- constraint measurements travel as **sums and counts** and are SUM-reduced (:func:`all_reduce_sums`); rates
  are formed after the reduction, never averaged across ranks;
- the KD loss is the **global** token mean, ``loss = Σ_local / N_global · world_size``
  (:func:`global_token_mean`), because DDP averages gradients over ranks; gradients then equal those of one
  process on the global batch even when shards are uneven;
- state that every rank must hold identically (multipliers, teacher-weight running statistics) is checked with
  :func:`assert_identical_across_ranks`, which raises on **every** rank so none is left waiting in a collective;
- files (checkpoints, step logs, audits) are written by rank 0 only (:func:`run_on_rank_zero`); the state of a
  student sharded with FSDP (``fully_shard``) is gathered into full tensors first, by every rank
  (:func:`full_state_dicts`), and a full state is loaded back into shards by :func:`load_full_state_dicts`.

Collectives run on the tensor's own device, except under NCCL, which needs CUDA tensors: inputs are moved to
the current CUDA device for the collective and the result is moved back.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistributedDivergenceError",
    "assert_identical_across_ranks",
    "assert_states_identical",
    "all_reduce_sums",
    "barrier",
    "destroy",
    "full_state_dicts",
    "get_rank",
    "get_world_size",
    "global_token_mean",
    "init_from_env",
    "is_distributed",
    "is_rank_zero",
    "is_sharded",
    "load_full_state_dicts",
    "run_on_rank_zero",
    "shard_slice",
    "token_mean_scale",
    "unwrap",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedDivergenceError(RuntimeError):
    """State that must be identical on every rank differs between ranks."""


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process in the default group (0 on a single process)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 on a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """True on rank 0 and on a single process."""
    return get_rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from a launcher's environment (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); returns whether training is distributed.

    Does nothing and returns ``False`` when ``WORLD_SIZE`` is unset or 1; returns ``True`` at once when a group
    already exists. ``backend`` defaults to NCCL when CUDA is available (each process then uses the GPU
    ``LOCAL_RANK``), else gloo.
    """
    if is_distributed():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed support")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    logger.info("initialised torch.distributed: backend=%s rank=%d world_size=%d", backend, get_rank(), world)
    return True


def destroy() -> None:
    """Destroy the default process group if one exists (safe to call on one process)."""
    if is_distributed():
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when distributed and ``module`` has trainable parameters, else ``module``.

    Under NCCL the module is expected on the current CUDA device already; ``device_ids`` is set to it.
    """
    if not is_distributed() or not any(p.requires_grad for p in module.parameters()):
        return module
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[torch.cuda.current_device()])
    return torch.nn.parallel.DistributedDataParallel(module)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``module`` itself otherwise)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` has DTensor parameters (FSDP's ``fully_shard``): its state then holds shards, not tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _param_fqns(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name in ``module`` of each of ``optimizer``'s parameters, in the order of ``optimizer.state_dict()``'s ids."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state_dicts(module: torch.nn.Module,
                     optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """``module.state_dict()`` and ``optimizer.state_dict()`` with full tensors, so a file of them loads anywhere.

    For a sharded module (:func:`is_sharded`) the shards are gathered into CPU tensors with
    ``torch.distributed.checkpoint.state_dict``: a collective that every rank must call; rank 0 gets the states (in
    the plain layout, optimizer parameters as integer ids) and the other ranks get empty dicts. Otherwise the
    plain ``state_dict()`` of each is returned.
    """
    if not is_sharded(module):
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    optim_state = get_optimizer_state_dict(module, optimizer, options=options)
    if not optim_state:  # ranks other than 0
        return model_state, {}
    ids = {n: i for i, n in enumerate(_param_fqns(module, optimizer))}
    return model_state, {"state": {ids[n]: st for n, st in optim_state["state"].items()},
                         "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                                          for g in optim_state["param_groups"]]}


def load_full_state_dicts(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: Mapping[str, Any],
                          optim_state: Mapping[str, Any]) -> None:
    """Inverse of :func:`full_state_dicts`: load full states into ``module`` and ``optimizer``, sharding them
    when ``module`` is sharded (then a collective: every rank must call it with the same full states)."""
    if not is_sharded(module):
        module.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    fqns = _param_fqns(module, optimizer)
    saved_ids = [i for g in optim_state["param_groups"] for i in g["params"]]
    names = dict(zip(saved_ids, fqns))  # saved id -> parameter name, by position (as Optimizer.load_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, dict(model_state), options=options)
    set_optimizer_state_dict(module, optimizer, {
        "state": {names[i]: st for i, st in optim_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]],
    }, options=options)


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if is_distributed():
        dist.barrier()


def _collective_device(tensor: Tensor) -> torch.device:
    """Device a collective on ``tensor`` must run on: the current CUDA device under NCCL, else the tensor's."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sums(tensor: Tensor) -> Tensor:
    """SUM-reduce stacked sufficient statistics (sums and counts) over all ranks: ``out = Σ_r tensor_r``.

    Returns a new tensor on ``tensor``'s device and dtype; the input is not modified. On a single process the
    input is returned unchanged. Use it on numerators and denominators only, and form rates afterwards: the
    mean of per-rank ratios is not the global ratio when shards are uneven.

    Raises:
        TypeError: ``tensor`` is not a floating-point or integer tensor.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"all_reduce_sums: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"all_reduce_sums: tensor must be real floating point or integer, got {tensor.dtype}")
    if not is_distributed():
        return tensor
    device = _collective_device(tensor)
    buf = tensor.detach().to(device=device, copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def global_token_mean(local_sum: Tensor, local_count: Tensor | int | float) -> Tensor:
    """Per-rank loss whose DDP-averaged gradient equals the gradient of the global token mean.

    ``loss_r = S_r / N · W`` with ``N = Σ_r N_r`` (all-reduced, no gradient) and ``W`` the world size. DDP
    averages gradients, ``(1/W) Σ_r ∇loss_r = ∇(Σ_r S_r) / N``, i.e. the single-process gradient of the
    token mean over the global batch, with uneven shards included. On one process this is ``S / N``.
    A global count of zero gives ``0·S`` (a zero loss that keeps the graph).
    """
    count = torch.as_tensor(local_count, dtype=local_sum.dtype, device=local_sum.device).detach()
    if count.ndim != 0:
        raise ValueError(f"global_token_mean: local_count must be a scalar, got shape {tuple(count.shape)}")
    total = all_reduce_sums(count.reshape(1)).reshape(())
    return local_sum * token_mean_scale(total, get_world_size())


def token_mean_scale(total: Tensor, world_size: int) -> Tensor:
    """``W / N`` for a global count ``N = total > 0``, else 0 (so ``S·scale`` is a zero loss that keeps the graph);
    computed on ``total``'s device without a host sync."""
    positive = total > 0
    return torch.where(positive, world_size / torch.where(positive, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def assert_identical_across_ranks(name: str, tensor: Tensor, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Raise :class:`DistributedDivergenceError` on every rank if ``tensor`` differs between ranks.

    Exact by default (``|x_r − x_0| ≤ atol + rtol·|x_0|`` elementwise, both zero). All ranks gather the sizes and
    then the values, so every rank reaches the same verdict and raises together; the error names ``name``, the
    diverging ranks and the largest difference. NaN equals NaN here. No-op on one process.
    """
    assert_states_identical({name: tensor}, atol=atol, rtol=rtol)


def assert_states_identical(tensors: Mapping[str, Tensor], *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """:func:`assert_identical_across_ranks` for several named tensors with two collectives in all (the values
    are concatenated); the error names the first tensor that diverged. No-op on one process or an empty mapping."""
    if not is_distributed() or not tensors:
        return
    names = list(tensors)
    first = tensors[names[0]]
    device = _collective_device(first)
    world = get_world_size()
    flats = [tensors[n].detach().reshape(-1).to(device=device, dtype=torch.float64) for n in names]
    sizes = torch.tensor([f.numel() for f in flats], dtype=torch.float64, device=device)
    gathered_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(gathered_sizes, sizes)
    size_rows = torch.stack(gathered_sizes)  # [world, n_tensors]
    if not bool((size_rows == size_rows[0]).all()):
        j = int((size_rows != size_rows[0]).any(0).nonzero()[0])
        per_rank = {r: int(size_rows[r, j]) for r in range(world)}
        raise DistributedDivergenceError(
            f"{names[j]!r} has a different number of elements on different ranks {per_rank}; every rank must hold "
            "the same state (same spec, same teachers, same constraints)."
        )
    flat = torch.cat(flats) if flats else sizes.new_zeros(0)
    values = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(values, flat.contiguous())
    rows = torch.stack(values)  # [world, total]
    ref = rows[0]
    both_nan = rows.isnan() & ref.isnan()
    diff = torch.where(both_nan, torch.zeros_like(rows), (rows - ref).abs())
    diff = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)
    bad = diff > atol + rtol * ref.abs()
    if not bool(bad.any()):
        return
    worst = int(bad.any(0).nonzero()[0])
    ends = torch.tensor([f.numel() for f in flats]).cumsum(0)
    j = int((ends <= worst).sum())
    offset = worst - (int(ends[j - 1]) if j else 0)
    ranks = [r for r in range(world) if bool(bad[r].any())]
    raise DistributedDivergenceError(
        f"{names[j]!r} diverged across ranks: ranks {ranks} differ from rank 0 (at flat index {offset}: rank 0 has "
        f"{float(ref[worst])!r}, ranks hold {[float(v) for v in rows[:, worst]]}; largest |difference| over all "
        f"checked state {float(diff.max()):.3e}). Every rank must apply the same update from all-reduced sums and "
        "counts; check that all ranks call step() equally often and use the same spec."
    )


def run_on_rank_zero(fn: Callable[..., T], *args: object, what: str = "rank-0 task", **kwargs: object) -> T | None:
    """Run ``fn(*args, **kwargs)`` on rank 0 only, then synchronise; returns its result on rank 0, ``None`` elsewhere.

    Barrier-safe: rank 0's success or failure is shared with one all-reduce before anyone returns, so a failure
    on rank 0 raises on every rank (rank 0 re-raises its own exception; the others raise ``RuntimeError``
    naming ``what``) instead of leaving them blocked. Other ranks may read what rank 0 wrote once this returns.
    """
    result: T | None = None
    error: BaseException | None = None
    if is_rank_zero():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised below after the other ranks are told
            error = exc
    if is_distributed():
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        flag = all_reduce_sums(flag)
        if int(flag.item()) and error is None:
            raise RuntimeError(f"{what} failed on rank 0; see rank 0's traceback")
    if error is not None:
        raise error
    return result


def shard_slice(n: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """Contiguous, unpadded shard of ``range(n)`` for ``rank``: sizes differ by at most one, none repeated.

    Unlike ``DistributedSampler`` (which pads with repeated samples), the shards partition the data exactly,
    so sums and counts over all ranks equal those of one process on all ``n`` items.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if n < 0:
        raise ValueError(f"shard_slice: n must be non-negative, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_slice: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
