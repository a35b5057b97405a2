"""Built-ins of the digits demo: real data and real teachers (scikit-learn's bundled 8×8 digits, no download).

- :func:`digits_splits` — a fixed-seed stratified split into ``teacher`` / ``distill`` / ``heldout`` parts, each a dict
  of tensors ``inputs [N, 64]`` (pixels / 16), ``labels [N]``.
- :func:`train_digits_teachers` — teachers of different quality trained on the ``teacher`` split: logistic
  regression, a scikit-learn MLP, a small torch CNN, k-nearest neighbours, and a **biased** teacher (logistic
  regression whose logit for the forbidden class is raised by ``bias``, so it over-predicts that class).
- :func:`teacher_logprobs` — cached teacher log-probabilities ``[N, K, V]`` (``log`` of ``predict_proba`` clipped at
  ``p_min`` and renormalised).
- :func:`digits_student` — the student MLP.
- :data:`FUNCTIONS` — the named callables the demo spec refers to (``forbidden_fpr`` and its proxy, the unsafe
  mask ``forbidden_when_wrong``), built for a forbidden class by :func:`digits_functions`.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "NUM_CLASSES",
    "DigitsTeacher",
    "digits_splits",
    "train_digits_teachers",
    "teacher_logprobs",
    "digits_student",
    "digits_functions",
    "digits_teacher_fns",
    "FORBIDDEN_CLASS",
    "FUNCTIONS",
]

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
FORBIDDEN_CLASS = 8


def digits_splits(seed: int = 0, fractions: tuple[float, float, float] = (0.4, 0.35, 0.25),
                  dtype: torch.dtype = torch.float32) -> dict[str, dict[str, Tensor]]:
    """Stratified ``teacher`` / ``distill`` / ``heldout`` splits of ``sklearn.datasets.load_digits`` (1797 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions!r}")
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    idx = np.arange(len(y))
    i_teach, i_rest = train_test_split(idx, train_size=fractions[0], stratify=y, random_state=seed)
    i_dist, i_held = train_test_split(i_rest, train_size=fractions[1] / (fractions[1] + fractions[2]),
                                      stratify=y[i_rest], random_state=seed + 1)

    def part(i: np.ndarray) -> dict[str, Tensor]:
        return {"inputs": torch.as_tensor(x[i], dtype=dtype), "labels": torch.as_tensor(y[i], dtype=torch.long)}

    return {"teacher": part(i_teach), "distill": part(i_dist), "heldout": part(i_held)}


@dataclass
class DigitsTeacher:
    """A trained teacher: ``name`` and ``predict_proba(x [N, 64] numpy) -> [N, V]``."""

    name: str
    predict_proba: Callable[[np.ndarray], np.ndarray]


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 × 4 × 4
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 × 2 × 2
            nn.Flatten(), nn.Linear(128, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(-1, 1, 8, 8))


def _train_cnn(x: Tensor, y: Tensor, seed: int, epochs: int, device: torch.device) -> _SmallCNN:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _SmallCNN().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = x.to(device), y.to(device)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen).to(device)
        for b in perm.split(64):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


def train_digits_teachers(train: Mapping[str, Tensor], *, forbidden_class: int = FORBIDDEN_CLASS, bias: float = 7.0,
                          seed: int = 0, cnn_epochs: int = 15, device: str | torch.device = "cpu"
                          ) -> list[DigitsTeacher]:
    """Fit five teachers on ``train``: logreg, mlp, cnn, knn and ``biased``.

    The biased teacher is ``softmax(2·z + bias·e_f)`` with ``z`` the logistic regression's log-probabilities:
    sharper (so confidence-based weighting trusts it) and tilted towards the forbidden class ``f``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier

    if not 0 <= forbidden_class < NUM_CLASSES:
        raise ValueError(f"forbidden_class must be in [0, {NUM_CLASSES}), got {forbidden_class}")
    x = train["inputs"].double().numpy()
    y = train["labels"].numpy()
    logreg = LogisticRegression(max_iter=500, C=1.0).fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning for the capped iteration budget
        mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=seed).fit(x, y)
    knn = KNeighborsClassifier(n_neighbors=7).fit(x, y)
    dev = torch.device(device)
    cnn = _train_cnn(train["inputs"].float(), train["labels"], seed, cnn_epochs, dev)

    def cnn_proba(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(cnn(torch.as_tensor(a, dtype=torch.float32, device=dev)), -1).cpu().double().numpy()

    def biased_proba(a: np.ndarray) -> np.ndarray:
        z = 2.0 * logreg.predict_log_proba(a)
        z[:, forbidden_class] += bias
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    return [
        DigitsTeacher("logreg", logreg.predict_proba),
        DigitsTeacher("mlp", mlp.predict_proba),
        DigitsTeacher("cnn", cnn_proba),
        DigitsTeacher("knn", knn.predict_proba),
        DigitsTeacher("biased", biased_proba),
    ]


def teacher_logprobs(teachers: list[DigitsTeacher], inputs: Tensor, p_min: float = 1e-4) -> Tensor:
    """Cached teacher log-probabilities ``[N, K, V]``: ``log(max(p, p_min) / Σ max(p, p_min))`` per teacher."""
    if not 0.0 < p_min < 1.0 / NUM_CLASSES:
        raise ValueError(f"p_min must be in (0, 1/{NUM_CLASSES}), got {p_min}")
    x = inputs.detach().cpu().double().numpy()
    probs = np.stack([t.predict_proba(x) for t in teachers], axis=1)  # [N, K, V]
    probs = np.clip(probs, p_min, None)
    probs /= probs.sum(-1, keepdims=True)
    return torch.as_tensor(np.log(probs), dtype=inputs.dtype, device=inputs.device)


def digits_teacher_fns(splits: Mapping[str, Mapping[str, Tensor]], *, seed: int = 0,
                       device: str | torch.device = "cpu", split: str = "teacher", **kwargs: object
                       ) -> dict[str, Callable[[Tensor], Tensor]]:
    """Job factory: train the digits teachers on ``splits[split]`` and return ``{name: fn(inputs) -> log-probs}``
    (log-probabilities are valid logits); ``kwargs`` go to :func:`train_digits_teachers`."""
    if split not in splits:
        raise ValueError(f"digits teachers train on split {split!r}, which the data lacks (have {sorted(splits)})")
    teachers = train_digits_teachers(splits[split], seed=seed, device=device, **kwargs)  # type: ignore[arg-type]
    return {t.name: (lambda x, t=t: teacher_logprobs([t], x)[:, 0]) for t in teachers}


def digits_student(seed: int = 0, hidden: int = 64) -> nn.Module:
    """The student: ``64 → hidden → hidden → 10`` ReLU MLP, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, NUM_CLASSES))


def digits_functions(forbidden_class: int = FORBIDDEN_CLASS) -> dict[str, Callable[..., object]]:
    """Named callables for a spec about forbidden class ``f`` (examples are rows; ``labels [N]``):

    - ``forbidden_fpr(logits, batch)`` → ``(Σ 1[argmax = f ∧ y ≠ f], Σ 1[y ≠ f])``: the false-positive rate on ``f``
      ("predicts the forbidden class when it is wrong"), a count-based rate;
    - ``forbidden_fpr_proxy`` → ``(Σ p_θ(f)·1[y ≠ f], Σ 1[y ≠ f])``: its differentiable proxy;
    - ``forbidden_when_wrong(batch, V)`` → mask ``[N, V]`` that marks ``f`` as unsafe on examples with ``y ≠ f``.
    """
    f = int(forbidden_class)
    if not 0 <= f < NUM_CLASSES:
        raise ValueError(f"forbidden_class must be in [0, {NUM_CLASSES}), got {forbidden_class}")

    def forbidden_fpr(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        neg = batch["labels"] != f
        return ((logits.argmax(-1) == f) & neg).sum().to(logits.dtype), neg.sum().to(logits.dtype)

    def forbidden_fpr_proxy(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        neg = batch["labels"] != f
        p_f = torch.softmax(logits, dim=-1)[..., f]
        return (p_f * neg.to(p_f.dtype)).sum(), neg.sum().to(p_f.dtype)

    def forbidden_when_wrong(batch: Mapping[str, Tensor] | None, vocab_size: int) -> Tensor:
        if batch is None or "labels" not in batch:
            raise ValueError("forbidden_when_wrong needs batch['labels']")
        labels = torch.as_tensor(batch["labels"])
        cls = torch.arange(vocab_size, device=labels.device)
        return (cls == f) & (labels != f).unsqueeze(-1)

    forbidden_fpr.support = "binary"  # type: ignore[attr-defined]  # one 0/1 outcome per counted example
    return {"forbidden_fpr": forbidden_fpr, "forbidden_fpr_proxy": forbidden_fpr_proxy,
            "forbidden_when_wrong": forbidden_when_wrong}


FUNCTIONS: dict[str, Callable[..., object]] = digits_functions(FORBIDDEN_CLASS)
