"""Live teachers: one call per batch for all of them, and derived teachers that share a base forward.

A *derived teacher* is a transform of another teacher's logits, z' = f(z_base): a jailbroken copy modelled as
the base plus a shift on some tokens, a tempered or filtered view, a vocabulary-mapped view. Given to
:class:`~safekd.distiller.SafeDistiller` (or ``SafeKDTrainer``) next to its base, or next to other teachers
derived from the same base, the base runs **once** per batch: :func:`teacher_outputs` calls every distinct
callable once and applies the transforms to its output.

    base = AutoModelForCausalLM.from_pretrained("...")
    teachers = {"clean": base, "jailbroken": derived(base, lambda z: z + shift)}
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from safekd.targets.head import StudentHidden

__all__ = ["DerivedTeacher", "derived", "teacher_outputs", "logits_of"]


def logits_of(out: Any, who: str = "teacher") -> Tensor:
    """A model's output as a logits tensor: the tensor itself, its ``logits`` (a Hugging Face ``ModelOutput`` or a
    mapping), or the logits of a :class:`~safekd.head.StudentHidden` (hidden states + LM head).

    Raises:
        TypeError: neither (the message names ``who``).
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, StudentHidden):
        return out.logits()
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        fix = ("convert it with torch.from_numpy" if type(out).__module__ == "numpy" else
               "wrap a model that returns a tuple or another output object in safekd.LogitsOf(model)")
        raise TypeError(f"{who} returned a {type(out).__name__}, not a logits tensor [..., V] (or an output with "
                        f".logits); {fix}")
    return logits


class DerivedTeacher(nn.Module):
    """The teacher ``transform(logits of base(inputs))``; ``base`` and ``transform`` may be modules (then moved
    with this one) or plain callables."""

    def __init__(self, base: Callable[..., Any], transform: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        if not callable(base) or not callable(transform):
            raise TypeError(f"derived(base, transform) needs two callables, got {type(base).__name__} and "
                            f"{type(transform).__name__}")
        self.base, self.transform = base, transform

    def forward(self, inputs: Any) -> Tensor:
        return self.transform(logits_of(self.base(inputs), "the base of a derived teacher"))


def derived(base: Callable[..., Any], transform: Callable[[Tensor], Tensor]) -> DerivedTeacher:
    """A teacher defined as ``transform`` of ``base``'s logits (it shares ``base``'s forward; see the module)."""
    return DerivedTeacher(base, transform)


def teacher_outputs(teachers: Sequence[Callable[..., Any]], inputs: Any,
                    names: Sequence[str] | None = None) -> list[Tensor]:
    """Each teacher's logits on ``inputs``, calling every distinct callable (a teacher, or the base of derived
    teachers, at any depth) once; outputs with ``.logits`` are unwrapped."""
    seen: dict[int, Tensor] = {}

    def run(fn: Callable[..., Any], who: str) -> Tensor:
        key = id(fn)
        if key not in seen:
            seen[key] = fn.transform(run(fn.base, f"the base of {who}")) if isinstance(fn, DerivedTeacher) else \
                logits_of(fn(inputs), who)
        return seen[key]

    names = names or [f"teacher {i}" for i in range(len(teachers))]
    return [run(fn, f"teacher {n!r}") for fn, n in zip(teachers, names)]
