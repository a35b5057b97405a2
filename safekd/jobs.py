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

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safekd.auditing.core import audit
from safekd.auditing.render import write_report
from safekd.auditing.report import AuditReport
from safekd.distributed import barrier, is_rank_zero, run_on_rank_zero, shard_slice, unwrap, wrap_ddp
from safekd.references import import_reference
from safekd.spec import Locator, Spec, SpecError, load_document

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
    import safekd.weighting as W

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
    from safekd import pooling

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
    """A fresh student from the job's factory, seeded with ``job.seed``, on ``device``."""
    torch.manual_seed(job.seed)
    return resolve(job.student, "student")(seed=job.seed, **job.student_args).to(device)


def _make_distiller(job: Job, student: nn.Module, log: Any | None = None) -> Any:
    from safekd.distiller import SafeDistiller

    opt = torch.optim.Adam(student.parameters(), lr=job.lr)
    return SafeDistiller(student, None, opt, job.spec, weighting=build_weighting(job.weighting, len(job.spec.teachers)),
                         pool=_pool(job.pool), log=log)


def train_student(job: Job, train: Mapping[str, Tensor], *, device: str | torch.device = "cpu",
                  step_log: str | Path | None = None, progress: bool = False, desc: str = "distil") -> Any:
    """Distil a fresh student on ``train`` for ``job.epochs`` epochs; returns the :class:`SafeDistiller`."""
    from tqdm.auto import tqdm

    from safekd.steplog import StepLog

    dev = _device(device)
    student = _build_student(job, dev)
    data = {k: v.to(dev) for k, v in train.items() if isinstance(v, Tensor)}
    n = data["inputs"].shape[0]
    gen = torch.Generator().manual_seed(job.seed)
    log = StepLog(step_log, summary_every=0) if step_log is not None else None
    distiller = _make_distiller(job, wrap_ddp(student), log)  # DDP under torchrun; the student itself otherwise
    steps = job.epochs * math.ceil(n / job.batch_size)
    try:
        with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
            for _ in range(job.epochs):
                perm = torch.randperm(n, generator=gen).to(dev)
                for idx in perm.split(job.batch_size):
                    idx = idx[shard_slice(len(idx))]  # this rank's share of the global batch (all of it on one process)
                    distiller.step({k: v[idx] for k, v in data.items()})
                    bar.update(1)
    finally:
        if log is not None:
            log.close()
    student.eval()
    return distiller


@dataclass
class JobResult:
    report: AuditReport | None  # None on ranks other than 0 under torchrun (rank 0 audits)
    checkpoint: Path
    step_log: Path
    paths: dict[str, Path]
    distiller: Any


def run_training(job: Job, out_dir: str | Path | None = None, *, device: str | torch.device = "cpu",
                 progress: bool = False, splits: dict[str, dict[str, Tensor]] | None = None,
                 metrics: Mapping[str, float] | None = None) -> JobResult:
    """Train (``checkpoint.pt`` + ``steps.jsonl``), then audit on the audit split (``report.json/.html/.md``)."""
    out = Path(out_dir) if out_dir is not None else job.out
    out.mkdir(parents=True, exist_ok=True)
    splits = splits if splits is not None else prepare_data(job, device)
    step_log = out / "steps.jsonl"
    if is_rank_zero() and step_log.exists():
        step_log.unlink()
    barrier()
    distiller = train_student(job, splits[job.train_split], device=device, step_log=step_log, progress=progress)
    ckpt = out / "checkpoint.pt"
    distiller.save_checkpoint(str(ckpt))  # rank 0 writes

    def audit_and_write() -> tuple[AuditReport, dict[str, Path]]:
        report = audit(unwrap(distiller.student), splits[job.audit_split], job.spec, confidence=job.confidence,
                       step_log=str(step_log), distiller=distiller, seed=job.seed, metrics=metrics, progress=progress)
        return report, write_report(report, out)

    report, paths = run_on_rank_zero(audit_and_write, what="the audit") or (None, {})  # None on ranks other than 0
    return JobResult(report=report, checkpoint=ckpt, step_log=step_log, paths=paths, distiller=distiller)


def _load_data_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping) or "inputs" not in data:
        raise ValueError(f"{path}: audit data must be a dict of tensors with 'inputs' (and usually 'labels')")
    return dict(data)


def audit_checkpoint(job: Job, checkpoint: str | Path, data: str | Path | None = None, *, confidence: float | None = None,
                     step_log: str | Path | None = None, device: str | torch.device = "cpu",
                     progress: bool = False) -> AuditReport:
    """Audit the student saved in ``checkpoint`` on ``data`` (a ``.pt`` dict of tensors, a split name of the job's
    data, or None for the job's audit split)."""
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(2, "No such file", str(ckpt))
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
