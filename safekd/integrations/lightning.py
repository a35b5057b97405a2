"""Lightning integration: :class:`SafeKDModule`, a ``LightningModule`` whose training step is one safekd step
(needs ``pip install safekd[lightning]``).

``training_step`` runs :meth:`SafeDistiller.loss <safekd.distiller.SafeDistiller.loss>` on the batch — weights
projected onto the spec's teacher-weight set, pooled target, KD loss ``Σ_t D(q_t ‖ p_θ) / N`` (global token mean
under DDP) — and :meth:`~safekd.distiller.SafeDistiller.finish_step` (dual step, record), and returns the
Lagrangian ``L + Σ_j λ_j ĝ_j``; Lightning back-propagates, accumulates,
clips and steps (automatic optimisation, any strategy including DDP). Each constraint's value, residual and
multiplier and each teacher's weight go through ``self.log_dict`` to the Trainer's loggers.

    class Distil(SafeKDModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.student.parameters(), lr=1e-3)

    module = Distil(student, teachers={"clean": t1, "raw": t2}, spec=load_spec("spec.yaml"))
    lightning.Trainer(max_steps=1000).fit(module, loader)   # batches: {"inputs", "labels", "mask", ...}
    report = safekd.audit(module.student, heldout, module.spec, distiller=module.distiller)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
from torch import Tensor, nn

from safekd.training.distiller import SafeDistiller, StepRecord
from safekd.integrations.base import record_metrics, weighting_to
from safekd.spec.document import Spec

__all__ = ["SafeKDModule"]


class SafeKDModule(L.LightningModule):
    """Base (or mix-in) ``LightningModule`` distilling ``teachers`` into ``student`` under ``spec``.

    Subclasses define ``configure_optimizers`` over ``self.student``'s parameters; they may override
    ``training_step`` and call :meth:`safekd_step` inside it. Batches are safekd batches (``inputs``; optional
    ``teacher_logits``, ``labels``, ``mask``, ``task_ids``, ``context``).

    Args:
        student: module mapping ``batch["inputs"]`` to logits ``[..., V]`` (a submodule, so Lightning moves,
            wraps and checkpoints it).
        teachers: ``{name: module or callable}`` for every teacher of ``spec`` (kept out of the module's state;
            modules are moved to the training device, frozen and put in eval mode), or None when batches carry
            cached ``teacher_logits``.
        spec: the :class:`~safekd.spec.Spec`.
        weighting, pool, divergence, order, step_log: as for :class:`~safekd.distiller.SafeDistiller`.

    Attributes:
        distiller: the :class:`~safekd.distiller.SafeDistiller` (built at the first training step; Lightning owns
            backward and the optimizer step).
        last_record: the latest :class:`~safekd.distiller.StepRecord`.
    """

    def __init__(self, student: nn.Module, teachers: Mapping[str, Callable[[Any], Tensor]] | None, spec: Spec, *,
                 weighting: nn.Module | Mapping[str, nn.Module] | None = None,
                 pool: Callable[[Tensor, Tensor], Tensor] | None = None, divergence: Callable[..., Any] | None = None,
                 order: Literal["simultaneous", "dual_primal", "primal_dual"] = "simultaneous",
                 step_log: Any | None = None) -> None:
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a safekd Spec (see safekd.load_spec), got {type(spec).__name__}")
        super().__init__()
        self.student = student
        self.spec = spec
        # a plain dict, not a ModuleDict: teacher weights stay out of checkpoints and out of DDP's buckets
        self.teachers = None if teachers is None else dict(teachers)
        self.weighting = weighting
        self._distiller_kwargs = {"pool": pool, "divergence": divergence, "order": order, "log": step_log}
        self.distiller: SafeDistiller | None = None
        self.last_record: StepRecord | None = None

    def forward(self, inputs: Any) -> Tensor:
        return self.student(inputs)

    def _build_distiller(self) -> SafeDistiller:
        optimizers = self.trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"SafeKDModule needs exactly one optimizer (the student's), configure_optimizers gave "
                             f"{len(optimizers)}")
        if self.teachers is not None:
            for t in self.teachers.values():
                if isinstance(t, nn.Module):
                    t.to(self.device).eval().requires_grad_(False)
        return SafeDistiller(self.student, self.teachers, optimizers[0], self.spec,
                             weighting=weighting_to(self.weighting, self.device), **self._distiller_kwargs)

    def safekd_step(self, batch: Mapping[str, Any]) -> Tensor:
        """One safekd step on ``batch``: logs its scalars and returns the Lagrangian for Lightning's backward."""
        if self.distiller is None:
            self.distiller = self._build_distiller()
        loss, pending = self.distiller.loss(batch)
        self.last_record = self.distiller.finish_step(pending)
        inputs = batch["inputs"]
        self.log_dict(record_metrics(self.last_record), on_step=True, on_epoch=False,
                      batch_size=int(inputs.shape[0]) if isinstance(inputs, Tensor) and inputs.dim() else 1)
        return loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        return self.safekd_step(batch)
