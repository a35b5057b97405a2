"""Hugging Face ``transformers`` integration: :class:`SafeKDTrainer`, a ``Trainer`` whose training loss is the
safekd Lagrangian (needs ``pip install safekd[hf]``).

Each training micro-batch runs :meth:`SafeDistiller.loss <safekd.distiller.SafeDistiller.loss>`: teacher logits,
adaptive weights projected onto the spec's teacher-weight set, pooled target, KD loss
``L = Σ_t D(q_t ‖ p_θ) / N`` (global token mean under DDP) and Lagrangian ``L + Σ_j λ_j ĝ_j``, then
:meth:`~safekd.distiller.SafeDistiller.finish_step`: the dual step ``λ_j ← rule(λ_j, g_j)`` and the record.
The Trainer back-propagates the Lagrangian, accumulates, clips and steps as usual, and each constraint's value,
residual and multiplier and each teacher's weight are added to the Trainer's training logs (so every
``report_to`` backend receives them).

    trainer = SafeKDTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
                            teachers={"clean": t1, "raw": t2}, spec=load_spec("spec.yaml"))
    trainer.train()
    report = safekd.audit(LogitsOf(trainer.model), safekd_batch(heldout), spec,
                                distiller=trainer.distiller)
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import Trainer

from safekd.training.distiller import SafeDistiller, StepRecord
from safekd.integrations.base import LogitsOf, record_metrics, weighting_to
from safekd.spec.document import Spec

__all__ = ["SafeKDTrainer", "safekd_batch", "LogitsOf"]

logger = logging.getLogger(__name__)

_HF_KEYS = ("input_ids", "attention_mask", "labels")


def safekd_batch(inputs: Mapping[str, Any], *, causal: bool = True) -> dict[str, Any]:
    """A Hugging Face batch as a safekd batch: ``inputs`` = ``input_ids [B, L]``, ``mask`` = ``attention_mask``
    as bool, ``labels`` = the token each position predicts (``labels`` shifted left by one for causal LMs, the
    last position ``-100``, which constraints ignore); other keys (``task_ids``, ``context``, cached
    ``teacher_logits``) pass through.

    Raises:
        ValueError: ``inputs`` has no ``input_ids``.
    """
    if "input_ids" not in inputs:
        raise ValueError(f"inputs must hold 'input_ids' (got keys {sorted(inputs)})")
    batch = {k: v for k, v in inputs.items() if k not in _HF_KEYS}
    batch["inputs"] = inputs["input_ids"]
    if inputs.get("attention_mask") is not None:
        batch["mask"] = inputs["attention_mask"].bool()
    labels = inputs.get("labels")
    if labels is not None:
        if causal:
            labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), -100)], dim=-1)
        batch["labels"] = labels
    return batch


class SafeKDTrainer(Trainer):
    """``transformers.Trainer`` distilling ``teachers`` into ``model`` under ``spec``'s constraints.

    Args:
        model, args, **trainer_kwargs: as for ``Trainer`` (datasets yield ``input_ids``, optional
            ``attention_mask``, ``labels``, and safekd keys such as ``task_ids``; pass
            ``remove_unused_columns=False`` in ``args`` to keep keys the model's ``forward`` does not take).
        teachers: ``{name: teacher}`` for every teacher of ``spec``, of any kind
            :class:`~safekd.distiller.SafeDistiller` accepts: a causal LM (its ``.logits`` are read), a
            :class:`~safekd.vocab.MappedTeacher`, a :func:`~safekd.teachers.derived` teacher (sharing its base's
            forward) or a plain callable ``input_ids -> logits``; modules are moved to the training device, put in
            eval mode and frozen. None when batches carry cached ``teacher_logits`` or a top-k cache.
        spec: the :class:`~safekd.spec.Spec`.
        weighting, pool, divergence, order, step_log: as for :class:`~safekd.distiller.SafeDistiller`
            (``step_log`` is a :class:`~safekd.steplog.StepLog`, written by rank 0 only).
        causal: labels are next-token targets of a causal LM (see :func:`safekd_batch`).

    Attributes:
        distiller: the :class:`~safekd.distiller.SafeDistiller` (built at the first training step; multipliers,
            meter, events); the Trainer owns backward and the optimizer step.
        last_record: the latest :class:`~safekd.distiller.StepRecord`.

    Evaluation (``evaluate``/``predict``) reports the model's own loss; audit constraints with
    :func:`safekd.audit` (pass ``distiller=trainer.distiller``).
    """

    def __init__(self, model: nn.Module | None = None, args: Any = None, *,
                 teachers: Mapping[str, Callable[..., Any]] | None, spec: Spec,
                 weighting: nn.Module | Mapping[str, nn.Module] | None = None,
                 pool: Callable[[Tensor, Tensor], Tensor] | None = None, divergence: Callable[..., Any] | None = None,
                 order: Literal["simultaneous", "dual_primal", "primal_dual"] = "simultaneous",
                 step_log: Any | None = None,
                 causal: bool = True, **trainer_kwargs: Any) -> None:
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a safekd Spec (see safekd.load_spec), got {type(spec).__name__}")
        super().__init__(model=model, args=args, **trainer_kwargs)
        # The Lagrangian is a per-micro-batch token mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.spec, self.causal = spec, causal
        self.teachers = None if teachers is None else {n: self._frozen(n, t) for n, t in teachers.items()}
        self.weighting = weighting
        self._distiller_kwargs = {"pool": pool, "divergence": divergence, "order": order, "log": step_log}
        self.distiller: SafeDistiller | None = None
        self.last_record: StepRecord | None = None

    def _frozen(self, name: str, teacher: Callable[..., Any]) -> Callable[..., Any]:
        """The teacher itself (called with the input ids; same object, so derived teachers still share its
        forward), moved to the device, in eval mode and frozen when it is a module."""
        if not callable(teacher):
            raise TypeError(f"teacher {name!r} must be a model or a callable input_ids -> logits, got "
                            f"{type(teacher).__name__}")
        if isinstance(teacher, nn.Module):
            teacher.to(self.args.device).eval().requires_grad_(False)
        return teacher

    def _distiller(self, model: nn.Module) -> SafeDistiller:
        if self.distiller is None:
            self.distiller = SafeDistiller(LogitsOf(model), self.teachers, self.optimizer, self.spec,
                                           weighting=weighting_to(self.weighting, self.args.device),
                                           **self._distiller_kwargs)
        else:
            self.distiller.student.model = model  # the (possibly DDP-wrapped) model of this call
        return self.distiller

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Any]:
        """Training: the batch's Lagrangian (``distiller.loss``; the dual step and record via ``finish_step``), which
        the Trainer back-propagates and steps. Evaluation: ``Trainer``'s own loss."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        distiller = self._distiller(model)
        loss, pending = distiller.loss(safekd_batch(inputs, causal=self.causal))
        self.last_record = distiller.finish_step(pending)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the latest step's constraints, multipliers and teacher weights to each training log."""
        if self.last_record is not None and "loss" in logs:
            logs = {**logs, **record_metrics(self.last_record)}
        super().log(logs, *args, **kwargs)
