"""Task-scale operators: running per-task teacher quality, and routing by task (or context) key."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from safekd.targets.signals import Signals
from safekd.targets.weighting.base import Scale, WeightOperator

__all__ = ["TaskQuality", "Routing"]


class TaskQuality(WeightOperator):
    """``g_k(τ) = −L̂_k(τ)``: the EMA of teacher k's held-out loss on task τ ("task-quality";
    NeMo RL per-microbatch CE scores, made a running per-task estimate).

    `update` folds a batch of held-out losses into the buffers ``loss_ema [T, K]`` / ``seen [T]`` (saved in
    ``state_dict``): ``L̂ ← m·L̂ + (1−m)·mean_batch`` (the first observation of a task sets ``L̂``).
    Unseen tasks get uniform weights. Bounded influence needs ε > 0 (or losses in a known range).
    """

    scale: Scale = "task"
    requires = frozenset({"task_ids"})
    permutation_equivariant = False

    def __init__(self, num_tasks: int, num_teachers: int, momentum: float = 0.9, beta: float = 1.0,
                 epsilon: float = 0.0) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(beta=beta, epsilon=epsilon, num_teachers=num_teachers)
        self.num_tasks = num_tasks
        self.momentum = float(momentum)
        self.register_buffer("loss_ema", torch.zeros(num_tasks, num_teachers))
        self.register_buffer("seen", torch.zeros(num_tasks, dtype=torch.bool))

    def _check_task_ids(self, task_ids: Tensor) -> Tensor:
        t = task_ids.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_tasks):
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}), got range "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t

    @torch.no_grad()
    def update(self, task_ids: Tensor, teacher_losses: Tensor, mask: Tensor | None = None) -> None:
        """Fold held-out losses ``teacher_losses [..., K]`` of examples with ``task_ids [...]`` into the EMA."""
        t = self._check_task_ids(task_ids).reshape(-1)
        K = self.loss_ema.shape[1]
        if teacher_losses.shape[-1] != K or teacher_losses.shape[:-1] != task_ids.shape:
            raise ValueError(f"teacher_losses must have shape [*task_ids.shape, {K}], "
                             f"got {tuple(teacher_losses.shape)}")
        losses = teacher_losses.detach().reshape(-1, K).to(self.loss_ema)
        if not bool(torch.isfinite(losses).all()):
            raise ValueError("teacher_losses contains NaN or inf")
        keep = torch.ones_like(t, dtype=torch.bool) if mask is None else mask.reshape(-1).to(torch.bool)
        wts = keep.to(losses.dtype)
        sums = torch.zeros_like(self.loss_ema).index_add_(0, t, losses * wts.unsqueeze(-1))
        counts = torch.zeros(self.num_tasks, dtype=losses.dtype, device=losses.device).index_add_(0, t, wts)
        present = counts > 0
        mean = sums / counts.clamp_min(1.0).unsqueeze(-1)
        ema = torch.where(self.seen.unsqueeze(-1), self.momentum * self.loss_ema + (1 - self.momentum) * mean, mean)
        self.loss_ema.copy_(torch.where(present.unsqueeze(-1), ema, self.loss_ema))
        self.seen |= present

    def scores(self, s: Signals) -> Tensor:
        t = self._check_task_ids(s.task_ids)
        ref = s.reference()
        table = -self.loss_ema
        if ref is not None and ref.is_floating_point():
            table = table.to(ref.dtype)
        return table[t]


class Routing(WeightOperator):
    """One teacher per key: ``w = (1−ε)·e_{r(key)} + ε/K`` with ``r = table.get(key, fallback)``
    (MOPD, arXiv 2601.02780 / 2606.30406; NeMo RL, TRL).

    ``key="task"`` reads ``task_ids``; ``key="context"`` reads an integer domain id in ``context [..., 1]``.
    """

    permutation_equivariant = False

    def __init__(self, table: dict[int, int], fallback: int, num_teachers: int, key: str = "task",
                 epsilon: float = 0.0) -> None:
        if key not in ("task", "context"):
            raise ValueError(f"key must be 'task' or 'context', got {key!r}")
        super().__init__(beta=1.0, epsilon=epsilon, num_teachers=num_teachers)
        for k, v in [*table.items(), ("fallback", fallback)]:
            if not 0 <= int(v) < num_teachers:
                raise ValueError(f"routing target for {k!r} is {v}, outside [0, {num_teachers})")
        self.key = key
        self.scale = "task" if key == "task" else "context"
        self.requires = frozenset({"task_ids" if key == "task" else "context"})
        self.fallback = int(fallback)
        self.context_dim = 1 if key == "context" else None
        self.register_buffer("keys", torch.tensor(list(table.keys()), dtype=torch.long))
        self.register_buffer("targets", torch.tensor(list(table.values()), dtype=torch.long))

    def route(self, s: Signals) -> Tensor:
        """Teacher index ``[...]`` for each example."""
        if self.key == "task":
            ids = s.task_ids.long()
        else:
            if s.context.shape[-1] != 1:
                raise ValueError(f"Routing(key='context') needs context of shape [..., 1] holding a domain id, "
                                 f"got {tuple(s.context.shape)}")
            ids = s.context[..., 0].round().long()
        match = ids.unsqueeze(-1) == self.keys.to(ids.device)
        chosen = (match.long() * self.targets.to(ids.device)).sum(-1)
        return torch.where(match.any(-1), chosen, torch.full_like(chosen, self.fallback))

    def scores(self, s: Signals) -> Tensor:
        ref = s.reference()
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
        onehot = torch.nn.functional.one_hot(self.route(s), self.num_teachers).to(dtype)
        return torch.log(onehot)

    def score_width(self) -> float | None:
        return math.inf
