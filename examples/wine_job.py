"""Hooks for a `safekd train` job on your own data, teachers and student (scikit-learn's bundled wine data).

`examples/wine_job.yaml` names these functions as ``wine_job:make_data`` etc.; ``safekd train --spec
examples/wine_job.yaml`` imports them from the job file's folder.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

FLAGGED = 2  # the class whose false positives we constrain


def make_data(seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """Data hook: ``{split: {"inputs": [N, F] float, "labels": [N] long}}`` (any extra batch keys pass through)."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    idx = list(range(len(y)))
    teach, rest = train_test_split(idx, test_size=0.6, stratify=y, random_state=seed)
    distill, heldout = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    as_split = lambda ids: {"inputs": torch.tensor(x[ids], dtype=torch.float32),  # noqa: E731
                            "labels": torch.tensor(y[ids], dtype=torch.long)}
    return {"teacher": as_split(teach), "distill": as_split(distill), "heldout": as_split(heldout)}


def make_teachers(splits: Mapping[str, Mapping[str, Tensor]], *, seed: int = 0, device: str = "cpu",
                  bias: float = 3.0) -> dict[str, Callable[[Tensor], Tensor]]:
    """Teachers hook: ``{name: fn(inputs [N, F]) -> logits [N, V]}``, here fitted on the ``teacher`` split.

    ``full`` sees every feature, ``half`` the first six, ``biased`` is ``full`` pushed towards the flagged class.
    """
    from sklearn.linear_model import LogisticRegression

    x, y = splits["teacher"]["inputs"].numpy(), splits["teacher"]["labels"].numpy()
    full = LogisticRegression(max_iter=500, random_state=seed).fit(x, y)
    half = LogisticRegression(max_iter=500, random_state=seed).fit(x[:, :6], y)

    def logits(model, cols: slice) -> Callable[[Tensor], Tensor]:
        w = torch.tensor(model.coef_, dtype=torch.float32, device=device)
        b = torch.tensor(model.intercept_, dtype=torch.float32, device=device)
        return lambda inputs: inputs[:, cols] @ w.T + b

    push = torch.zeros(3, device=device)
    push[FLAGGED] = bias
    return {"full": logits(full, slice(None)), "half": logits(half, slice(0, 6)),
            "biased": lambda inputs: logits(full, slice(None))(inputs) + push}


def make_student(seed: int = 0, hidden: int = 16) -> nn.Module:
    """Student hook: any ``nn.Module`` mapping ``inputs`` to logits ``[N, V]``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def flagged_fpr(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(#predicted flagged among the others, #others): the measured rate that drives the multiplier."""
    others = batch["labels"] != FLAGGED
    return ((logits.argmax(-1) == FLAGGED) & others).sum().float(), others.sum().float()


def flagged_fpr_proxy(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Its differentiable proxy: the student's probability of the flagged class on the others."""
    others = (batch["labels"] != FLAGGED).float()
    return (logits.softmax(-1)[:, FLAGGED] * others).sum(), others.sum()


def flagged_when_wrong(batch: Mapping[str, Tensor], vocab_size: int) -> Tensor:
    """Unsafe-set mask ``[N, V]``: the flagged class is unsafe on examples of the other classes."""
    classes = torch.arange(vocab_size, device=batch["labels"].device)
    return (classes == FLAGGED) & (batch["labels"] != FLAGGED).unsqueeze(-1)


FUNCTIONS = {"flagged_fpr": flagged_fpr, "flagged_fpr_proxy": flagged_fpr_proxy,
             "flagged_when_wrong": flagged_when_wrong}
