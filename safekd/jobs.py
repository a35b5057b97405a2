"""Spec'd training jobs: one YAML/TOML file = a ``job:`` section (data, teachers, student, training settings)
plus the constraint spec (every other top-level key, parsed by :class:`safekd.spec.Spec`).

Example (see ``examples/digits_spec.yaml``)::

    job:
      data: digits                      # built-in, or "module:function"(seed) -> {split: {inputs, labels, ...}}
      teachers: digits                  # built-in, or "module:function"(splits, seed, device) -> {name: fn(inputs) -> logits}
      student: digits_mlp               # built-in, or "module:function"(seed) -> nn.Module
      functions: digits                 # built-in, or "module:object" dict of the callables the spec names
      weighting: {operator: confidence, beta: 4.0, safety_prior: 0.5}
      pool: linear                      # linear | geometric
      train_split: distill
      audit_split: heldout
      epochs: 30
      batch_size: 64
      lr: 0.003
      seed: 0
      out: safekd-run
    teachers: [...]                     # the constraint spec, as in safekd.spec
    constraints: [...]

:func:`run_training` trains with :class:`~safekd.distiller.SafeDistiller`, writes ``checkpoint.pt``,
``steps.jsonl`` and the audit report; :func:`audit_checkpoint` audits a saved checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from safekd.common.batches import DataSource
from safekd.common.distributed import barrier, is_rank_zero, run_on_rank_zero, shard_slice, unwrap, wrap_ddp
from safekd.common.references import import_reference
from safekd.spec.document import Locator, Spec, SpecError, load_document

if TYPE_CHECKING:  # pragma: no cover - the audit stack (scipy.stats, matplotlib) loads only when a job audits
    from safekd.auditing.report import AuditReport

__all__ = ["Job", "JobResult", "load_job", "parse_job", "build_weighting", "prepare_data", "train_student",
           "run_training", "audit_checkpoint", "resolve"]

logger = logging.getLogger(__name__)

_BUILTINS: dict[str, dict[str, str]] = {
    "data": {"digits": "safekd.data.digits:digits_splits"},
    "teachers": {"digits": "safekd.data.digits:digits_teacher_fns"},
    "student": {"digits_mlp": "safekd.data.digits:digits_student"},
    "functions": {"digits": "safekd.data.digits:FUNCTIONS"},
}
_OPERATORS = {"confidence": "ConfidenceSoftmax", "entropy": "EntropySoftmax", "agreement": "AgreementSoftmax",
              "gold": "GoldLikelihood"}
_JOB_KEYS = ("data", "teachers", "student", "functions", "weighting", "pool", "train_split", "audit_split", "epochs",
             "batch_size", "lr", "seed", "out", "confidence", "student_args", "teacher_args")


def resolve(ref: str, kind: str = "object") -> Any:
    """A built-in name of ``kind`` (data / teachers / student / functions) or a ``"module:object"`` reference."""
    target = _BUILTINS.get(kind, {}).get(ref, ref)
    if ":" not in target:
        known = sorted(_BUILTINS.get(kind, {}))
        raise ValueError(f"job.{kind}: {ref!r} is neither a built-in ({known}) nor a 'module:object' reference")
    return import_reference(target, context=f"job.{kind}")


@dataclass(frozen=True)
class Job:
    """A parsed job file: the constraint :class:`Spec` plus how to get data, teachers and the student."""

    spec: Spec
    data: str = "digits"
    teachers: str = "digits"
    student: str = "digits_mlp"
    functions: str | None = None
    weighting: Mapping[str, Any] = field(default_factory=dict)
    pool: str = "linear"
    train_split: str = "distill"
    audit_split: str = "heldout"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    out: Path = Path("safekd-run")
    confidence: float = 0.95
    student_args: Mapping[str, Any] = field(default_factory=dict)
    teacher_args: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None

    def without_constraints(self) -> "Job":
        """The same job with no constraints and no safety prior (the unconstrained baseline)."""
        spec = Spec(teachers=self.spec.teachers, constraints=(), unsafe=self.spec.unsafe,
                    temperature=self.spec.temperature, dual=self.spec.dual, checks=self.spec.checks)
        w = {k: v for k, v in self.weighting.items() if k != "safety_prior"}
        return replace(self, spec=spec, weighting=w)


def parse_job(data: Mapping[str, Any], source: str | None = None,
              locate: Locator | None = None) -> Job:
    """Build a :class:`Job` from a dict (a ``job`` section plus the spec keys)."""
    data = dict(data)
    locate = locate or (lambda key: None)

    def err(key: str, message: str) -> SpecError:
        return SpecError(key, message, locate(key), source)

    job = data.pop("job", {}) or {}
    if not isinstance(job, Mapping):
        raise err("job", f"expected a mapping, got {type(job).__name__}")
    unknown = sorted(set(job) - set(_JOB_KEYS))
    if unknown:
        raise err(f"job.{unknown[0]}", f"unknown key; allowed: {list(_JOB_KEYS)}")
    functions = job.get("functions")
    try:
        registry = resolve(functions, "functions") if functions else {}
    except ValueError as exc:
        raise err("job.functions", str(exc)) from exc
    if not isinstance(registry, Mapping):
        raise err("job.functions", f"must name a dict of callables, got {type(registry).__name__}")
    spec = Spec.from_dict(data, functions=registry, source=source, locate=locate)
    kw: dict[str, Any] = {}
    for key, typ in (("epochs", int), ("batch_size", int), ("seed", int), ("lr", float), ("confidence", float)):
        if key in job:
            v = job[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not isinstance(v, int)) \
                    or not math.isfinite(v):
                raise err(f"job.{key}", f"expected {'an integer' if typ is int else 'a number'}, got {v!r}")
            kw[key] = typ(v)
    for key in ("epochs", "batch_size"):
        if kw.get(key, 1) < 1:
            raise err(f"job.{key}", f"must be >= 1, got {kw[key]}")
    if not 0 < kw.get("confidence", 0.5) < 1:
        raise err("job.confidence", f"must be in (0, 1), got {kw['confidence']}")
    for key in ("data", "teachers", "student", "pool", "train_split", "audit_split"):
        if key in job:
            if not isinstance(job[key], str) or not job[key]:
                raise err(f"job.{key}", f"expected a non-empty string, got {job[key]!r}")
            kw[key] = job[key]
    for key in ("weighting", "student_args", "teacher_args"):
        if key in job:
            if not isinstance(job[key], Mapping):
                raise err(f"job.{key}", f"expected a mapping, got {job[key]!r}")
            kw[key] = dict(job[key])
    if "out" in job:
        kw["out"] = Path(str(job["out"]))
    if kw.get("pool", "linear") not in ("linear", "geometric"):
        raise err("job.pool", f"expected 'linear' or 'geometric', got {kw['pool']!r}")
    out = Job(spec=spec, functions=functions, source=source, **kw)
    try:
        build_weighting(out.weighting, len(spec.teachers))
    except (ValueError, TypeError) as exc:
        raise err("job.weighting", str(exc)) from exc
    return out


def load_job(path: str | Path) -> Job:
    """Read and validate a job file (YAML/TOML); :class:`~safekd.spec.SpecError` names the bad key."""
    doc = load_document(path)
    return parse_job(doc.data, source=doc.source, locate=doc.locate)


def build_weighting(cfg: Mapping[str, Any], num_teachers: int) -> nn.Module | None:
    """Token-scale operator from ``{operator, beta, epsilon, safety_prior}`` (None / empty = uniform weights).

    ``operator`` is ``confidence`` | ``entropy`` | ``agreement`` | ``gold`` or a ``module:Class``;
    ``safety_prior: γ`` wraps it in :class:`~safekd.weighting.SafetyPrior` (needs teacher ``safety`` scores).
    """
    if not cfg:
        return None
    import safekd.targets.weighting as W

    unknown = sorted(set(cfg) - {"operator", "beta", "epsilon", "safety_prior"})
    if unknown:
        raise ValueError(f"unknown weighting key(s) {unknown}; allowed: operator, beta, epsilon, safety_prior")
    name = cfg.get("operator", "confidence")
    cls = getattr(W, _OPERATORS[name]) if name in _OPERATORS else resolve(name, "weighting")
    op = cls(beta=float(cfg.get("beta", 1.0)), epsilon=float(cfg.get("epsilon", 0.0)), num_teachers=num_teachers)
    if "safety_prior" in cfg:
        op = W.SafetyPrior(op, gamma=float(cfg["safety_prior"]))
    return op


def _pool(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    from safekd.targets import pooling

    return pooling.linear_pool if name == "linear" else pooling.geometric_pool


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available on this machine (use --device cpu)")
    return dev


@torch.no_grad()
def _cache_teacher_logits(splits: dict[str, dict[str, Tensor]], teachers: Mapping[str, Callable[[Tensor], Tensor]],
                          names: tuple[str, ...], chunk: int = 1024) -> None:
    missing = [n for n in names if n not in teachers]
    if missing:
        raise ValueError(f"the teacher factory returned {sorted(teachers)} but the spec names {list(names)} "
                         f"(missing {missing})")
    for part in splits.values():
        if "teacher_logits" in part:
            continue
        x = part["inputs"]
        part["teacher_logits"] = torch.cat([torch.stack([teachers[n](x[s:s + chunk]) for n in names], dim=-2)
                                            for s in range(0, x.shape[0], chunk)])


def prepare_data(job: Job, device: str | torch.device = "cpu") -> dict[str, dict[str, Tensor]]:
    """Load the job's splits and cache every teacher's logits in each split (``teacher_logits [N, K, V]``)."""
    dev = _device(device)
    splits = resolve(job.data, "data")(seed=job.seed)
    for need in (job.train_split, job.audit_split):
        if need not in splits:
            raise ValueError(f"job.data {job.data!r} has splits {sorted(splits)}, not {need!r}")
    _cache_teacher_logits(splits, _teacher_fns(job, splits, dev), job.spec.teacher_names)
    return splits


def _build_student(job: Job, device: torch.device) -> nn.Module:
    """A fresh student from the job's factory on ``device``, every RNG (torch, NumPy, Python) seeded with ``job.seed``
    (so that a run, and the RNG states its checkpoints hold, depend on the job alone)."""
    torch.manual_seed(job.seed)
    np.random.seed(job.seed)
    random.seed(job.seed)
    return resolve(job.student, "student")(seed=job.seed, **job.student_args).to(device)


def _make_distiller(job: Job, student: nn.Module, log: Any | None = None) -> Any:
    from safekd.training.distiller import SafeDistiller

    opt = torch.optim.Adam(student.parameters(), lr=job.lr)
    return SafeDistiller(student, None, opt, job.spec, weighting=build_weighting(job.weighting, len(job.spec.teachers)),
                         pool=_pool(job.pool), log=log)


_CHECKPOINT_GLOB = "step-*.pt"


@dataclass
class _Position:
    """Where a training loop is: ``epoch`` and the batches of it already taken (``batch``), the data-order
    generator's state at the start of that epoch, and the global step."""

    epoch: int = 0
    batch: int = 0
    generator: Tensor | None = None
    step: int = 0

    def to_dict(self, job: Job) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "generator": self.generator, "step": self.step,
                "job": _resume_key(job)}


def _resume_key(job: Job) -> dict[str, Any]:
    """The job settings a resumed run must share with the run that wrote the checkpoint."""
    return {"batch_size": job.batch_size, "seed": job.seed, "lr": job.lr, "pool": job.pool,
            "weighting": dict(job.weighting)}


def train_student(job: Job, train: DataSource, *, device: str | torch.device = "cpu",
                  step_log: str | Path | None = None, progress: bool = False, desc: str = "distil",
                  checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False) -> Any:
    """Distil a fresh student on ``train`` for ``job.epochs`` epochs; returns the :class:`SafeDistiller`.

    ``train`` is an in-memory dict of tensors (shuffled each epoch by a generator seeded with ``job.seed``, cut into
    ``job.batch_size`` rows, sharded across ranks under torchrun) or an iterable of batches such as a ``DataLoader``
    (walked as given, once per epoch; sharding and shuffling are the loader's). Either way one batch is held at a
    time (:func:`safekd.batches.iter_batches`).

    Every ``checkpoint_every`` steps (0 = never) a checkpoint ``step-NNNNNNNN.pt`` is written atomically to
    ``checkpoint_dir`` (the last two are kept) with the loop's position and the data-order generator; ``resume``
    continues from the newest one that loads (from scratch when there is none), skipping the batches of the current
    epoch already trained on: bit-identical to an uninterrupted run for in-memory data, and for an iterable that
    yields the same batches in the same order on every pass (a ``DataLoader`` with ``shuffle=True`` needs its own
    seeded ``generator``, re-seeded per epoch, for that).
    """
    from tqdm.auto import tqdm

    from safekd.common.batches import is_in_memory, iter_batches, num_examples, select_rows
    from safekd.training.steplog import StepLog

    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every / resume need a checkpoint_dir")
    dev = _device(device)
    in_memory = is_in_memory(train)
    if in_memory:
        data = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in train.items()}
        per_epoch: int | None = math.ceil(num_examples(data) / job.batch_size)
    else:
        data, per_epoch = train, (len(train) if hasattr(train, "__len__") else None)  # type: ignore[arg-type]
    student = _build_student(job, dev)
    gen = torch.Generator().manual_seed(job.seed)
    distiller = _make_distiller(job, wrap_ddp(student))  # DDP under torchrun; the student itself otherwise
    pos = _Position()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        assert ckpt_dir is not None
        pos = _resume(distiller, ckpt_dir, job)
        if pos.generator is not None:
            gen.set_state(pos.generator)
    if resume and step_log is not None and is_rank_zero():
        _truncate_step_log(Path(step_log), pos.step)  # steps after the checkpoint are trained again
    log = StepLog(step_log, summary_every=0) if step_log is not None else None
    distiller.log = log
    total = job.epochs * per_epoch if per_epoch is not None else None
    try:
        with tqdm(total=total, initial=pos.step, desc=desc, unit="step", disable=not progress, leave=False) as bar:
            for epoch in range(pos.epoch, job.epochs):
                if epoch != pos.epoch or pos.generator is None:
                    pos = _Position(epoch=epoch, batch=0, generator=gen.get_state(), step=pos.step)
                batches = iter_batches(data, job.batch_size if in_memory else None, shuffle=in_memory, generator=gen,
                                       device=dev)
                for i, batch in enumerate(batches):
                    if i < pos.batch:
                        continue  # trained on before the checkpoint
                    # this rank's rows of an in-memory batch under torchrun (all of them on one process)
                    distiller.step(select_rows(batch, shard_slice(num_examples(batch))) if in_memory else batch)
                    pos.batch, pos.step = i + 1, pos.step + 1
                    bar.update(1)
                    if checkpoint_every and pos.step % checkpoint_every == 0:
                        assert ckpt_dir is not None
                        _rotate_checkpoint(distiller, ckpt_dir, pos, job)
    finally:
        if log is not None:
            log.close()
        distiller.log = None
    student.eval()
    return distiller


def _rotate_checkpoint(distiller: Any, ckpt_dir: Path, pos: _Position, job: Job, keep: int = 2) -> None:
    """Write ``step-NNNNNNNN.pt`` atomically, then delete all but the newest ``keep`` (rank 0 only)."""
    from safekd.training.checkpoint import save_checkpoint

    if save_checkpoint(ckpt_dir / f"step-{pos.step:08d}.pt", distiller, extra={"train": pos.to_dict(job)}) is None:
        return
    for old in sorted(ckpt_dir.glob(_CHECKPOINT_GLOB))[:-keep]:
        old.unlink(missing_ok=True)


def _resume(distiller: Any, ckpt_dir: Path, job: Job) -> _Position:
    """Load the newest checkpoint of ``ckpt_dir`` that loads (into ``distiller`` and the RNGs) and return the loop
    position it holds; a fresh position when the directory has none."""
    from safekd.training.checkpoint import CheckpointError, load_checkpoint, load_file

    found = sorted(ckpt_dir.glob(_CHECKPOINT_GLOB), reverse=True)
    for path in found:
        try:
            payload = load_file(path, map_location="cpu")
        except (CheckpointError, OSError) as exc:  # a damaged file: try the previous checkpoint
            logger.warning("resume: cannot read %s (%s); trying the previous checkpoint", path, exc)
            continue
        train = payload.get("extra", {}).get("train")
        if train is None:
            raise ValueError(f"{path}: not a training checkpoint (no loop position); resume needs the step-*.pt "
                             "files that --checkpoint-every writes")
        if train["job"] != _resume_key(job):
            raise ValueError(f"{path} was written by a job with {train['job']}, this job has {_resume_key(job)}; "
                             "resume with the same job settings")
        load_checkpoint(path, distiller)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, train["step"], train["epoch"],
                    train["batch"])
        return _Position(epoch=train["epoch"], batch=train["batch"], generator=train["generator"], step=train["step"])
    logger.warning("resume: no checkpoint in %s; starting from scratch", ckpt_dir)
    return _Position()


def _truncate_step_log(path: Path, step: int) -> None:
    """Keep the step log's complete records up to ``step`` (0: an empty log), atomically."""
    if not path.exists():
        return
    keep = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line cut short by a crash
            if record.get("step", math.inf) > step:
                break
            keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class JobResult:
    report: "AuditReport | None"  # None on ranks other than 0 under torchrun (rank 0 audits)
    checkpoint: Path
    step_log: Path
    paths: dict[str, Path]
    distiller: Any


def run_training(job: Job, out_dir: str | Path | None = None, *, device: str | torch.device = "cpu",
                 progress: bool = False, splits: dict[str, dict[str, Tensor]] | None = None,
                 metrics: Mapping[str, float] | None = None, checkpoint_every: int = 0,
                 resume: bool = False) -> JobResult:
    """Train (``checkpoint.pt`` + ``steps.jsonl``), then audit on the audit split (``report.json/.html/.md``).

    ``checkpoint_every`` / ``resume``: periodic checkpoints in ``<out>/checkpoints`` and resuming from them (see
    :func:`train_student`); a resumed run appends to ``steps.jsonl`` (from the checkpoint's step on) instead of
    starting it afresh.
    """
    from safekd.auditing.core import audit
    from safekd.auditing.render import write_report

    out = Path(out_dir) if out_dir is not None else job.out
    out.mkdir(parents=True, exist_ok=True)
    splits = splits if splits is not None else prepare_data(job, device)
    step_log = out / "steps.jsonl"
    if is_rank_zero() and step_log.exists() and not resume:
        step_log.unlink()
    barrier()
    distiller = train_student(job, splits[job.train_split], device=device, step_log=step_log, progress=progress,
                              checkpoint_dir=out / "checkpoints", checkpoint_every=checkpoint_every, resume=resume)
    ckpt = out / "checkpoint.pt"
    distiller.save_checkpoint(str(ckpt))  # rank 0 writes

    def audit_and_write() -> tuple[AuditReport, dict[str, Path]]:
        report = audit(unwrap(distiller.student), splits[job.audit_split], job.spec, confidence=job.confidence,
                       step_log=str(step_log), distiller=distiller, seed=job.seed, metrics=metrics, progress=progress)
        return report, write_report(report, out)

    report, paths = run_on_rank_zero(audit_and_write, what="the audit") or (None, {})  # None on ranks other than 0
    return JobResult(report=report, checkpoint=ckpt, step_log=step_log, paths=paths, distiller=distiller)


def _load_data_file(path: Path) -> dict[str, Tensor]:
    from safekd.training.checkpoint import load_file

    data = load_file(path, what="audit data", redo="write it with torch.save({'inputs': ..., 'labels': ...}, path)",
                     map_location="cpu")
    if not isinstance(data, Mapping) or "inputs" not in data:
        raise ValueError(f"{path}: audit data must be a dict of tensors with 'inputs' (and usually 'labels')")
    return dict(data)


def audit_checkpoint(job: Job, checkpoint: str | Path, data: str | Path | None = None, *, confidence: float | None = None,
                     step_log: str | Path | None = None, device: str | torch.device = "cpu",
                     progress: bool = False) -> "AuditReport":
    """Audit the student saved in ``checkpoint`` on ``data`` (a ``.pt`` dict of tensors, a split name of the job's
    data, or None for the job's audit split)."""
    from safekd.training.checkpoint import read_checkpoint

    ckpt = Path(checkpoint)
    read_checkpoint(ckpt, map_location="cpu")  # a bad checkpoint is reported before any teacher is built
    dev = _device(device)
    if data is not None and Path(data).suffix == ".pt":
        audit_data = _load_data_file(Path(data))
        if "teacher_logits" not in audit_data:  # the teachers are rebuilt from the job's data factory
            splits = resolve(job.data, "data")(seed=job.seed)
            _cache_teacher_logits({"audit": audit_data}, _teacher_fns(job, splits, dev), job.spec.teacher_names)
    else:
        splits = prepare_data(job, dev)
        name = str(data) if data is not None else job.audit_split
        if name not in splits:
            raise ValueError(f"--data {name!r}: not a .pt file and not a split of job.data (splits: {sorted(splits)})")
        audit_data = splits[name]
    from safekd.auditing.core import audit

    student = _build_student(job, dev)
    distiller = _make_distiller(job, student)
    distiller.load_checkpoint(str(ckpt))
    student.eval()
    return audit(student, audit_data, job.spec, confidence=confidence if confidence is not None else job.confidence,
                 step_log=None if step_log is None else str(step_log), distiller=distiller, seed=job.seed,
                 progress=progress)


def _teacher_fns(job: Job, splits: dict[str, dict[str, Tensor]], device: torch.device
                 ) -> Mapping[str, Callable[[Tensor], Tensor]]:
    return resolve(job.teachers, "teachers")(splits, seed=job.seed, device=device, **job.teacher_args)
