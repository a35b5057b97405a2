"""Vocabulary mapping: use a teacher whose vocabulary differs from the student's.

A teacher with vocabulary ``V_t`` (a list of token strings, or a Hugging Face ``tokenizer.get_vocab()`` dict) is
restricted to the student's vocabulary ``V_s``. Each teacher id ``j`` is sent to one student id ``m(j)``: the
student token with the same (normalised) string, or the student's UNK/tail bucket ``u`` when the student has no
such token. The mapped distribution is

    p̃(s) = Σ_{j : m(j) = s} p_t(j)          (so p̃(u) holds the teacher's whole unmatched "tail" mass),

computed as a scatter-log-sum-exp over the teacher axis, batched over any leading dims. It sums to 1 over ``V_s``.
Student tokens that no teacher token maps to get probability 0 (log-prob ``-inf``), or ``smoothing / V_s`` after
the optional mixing ``(1 - smoothing)·p̃ + smoothing/V_s`` (keeps geometric pools and KL finite).

Inputs travel the other way: :meth:`VocabMap.encode` turns student ids into teacher ids (student tokens absent
from the teacher become the teacher's UNK id), so that a teacher can read the student's token stream position
by position. :class:`MappedTeacher` wraps any callable returning teacher logits ``[..., V_t]`` (an ``nn.Module``,
a function, a ``transformers`` ``AutoModelForCausalLM`` whose output has ``.logits``) into a teacher over ``V_s``.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from safekd.targets.signals import all_finite

__all__ = ["VocabMap", "build_vocab_map", "MappedTeacher", "strip_subword_markers"]

logger = logging.getLogger(__name__)

VocabLike = Sequence[str] | Mapping[str, int]


def strip_subword_markers(token: str) -> str:
    """Normaliser for byte-level BPE / SentencePiece vocabularies: drop a leading ``Ġ`` or ``▁`` (word start)."""
    return token[1:] if token[:1] in ("Ġ", "▁") and len(token) > 1 else token


def _as_itos(vocab: VocabLike, name: str, size: int | None = None) -> list[str | None]:
    """A vocabulary as an id-ordered list of strings (``None`` for ids no token names, e.g. padded model rows)."""
    if isinstance(vocab, Mapping):
        n = size if size is not None else (max(int(i) for i in vocab.values()) + 1 if vocab else 0)
        itos: list[str | None] = [None] * n
        for tok, idx in vocab.items():
            i = int(idx)
            if not 0 <= i < n or itos[i] is not None:
                raise ValueError(f"{name}: id {idx!r} of token {tok!r} is out of range [0, {n}) or repeated")
            itos[i] = str(tok)
        return itos
    if isinstance(vocab, str) or not isinstance(vocab, Sequence):
        raise TypeError(f"{name} must be a sequence of token strings or a dict token -> id, got {type(vocab).__name__}")
    itos = [str(t) for t in vocab]
    if size is not None:
        if size < len(itos):
            raise ValueError(f"{name}: size {size} is smaller than the vocabulary ({len(itos)} tokens)")
        itos = itos + [None] * (size - len(itos))
    return itos


@dataclass(frozen=True)
class VocabMap:
    """Many-to-one map from teacher ids to student ids, plus the student → teacher id map for inputs.

    ``index[j]`` is the student id of teacher id ``j`` (``unk_id`` for unmatched ones); ``encode_index[s]`` is the
    teacher id of student id ``s`` (the teacher UNK for unmatched ones); ``covered[s]`` says whether some teacher
    token maps to ``s`` other than through the tail.
    """

    index: Tensor            # [V_t] long, values in [0, V_s)
    encode_index: Tensor     # [V_s] long, values in [0, V_t)
    covered: Tensor          # [V_s] bool
    student_size: int
    unk_id: int

    @property
    def teacher_size(self) -> int:
        return int(self.index.numel())

    @property
    def coverage(self) -> float:
        """Fraction of the student vocabulary that some teacher token reaches directly."""
        return float(self.covered.float().mean())

    def to(self, device: torch.device | str) -> "VocabMap":
        return VocabMap(self.index.to(device), self.encode_index.to(device), self.covered.to(device),
                        self.student_size, self.unk_id)

    def encode(self, student_ids: Tensor) -> Tensor:
        """Student token ids ``[...]`` → teacher token ids ``[...]``."""
        if student_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"student_ids must be an integer tensor, got {student_ids.dtype}")
        if student_ids.numel() and (int(student_ids.min()) < 0 or int(student_ids.max()) >= self.student_size):
            raise ValueError(f"student_ids must lie in [0, {self.student_size}), got range "
                             f"[{int(student_ids.min())}, {int(student_ids.max())}]")
        return self.encode_index.to(student_ids.device)[student_ids.long()]

    def logprobs(self, teacher_logits: Tensor, smoothing: float = 0.0) -> Tensor:
        """Teacher logits ``[..., V_t]`` → log-probabilities over the student vocabulary ``[..., V_s]``.

        ``log p̃(s) = log Σ_{j: m(j)=s} softmax(z)_j``: one ``log_softmax`` over V_t, one gather for the student
        ids with a single source, and a log-sum-exp over the (few) teacher ids that share a student id
        (the UNK/tail bucket mostly); stable and differentiable. Then ``log((1 − smoothing)·p̃ + smoothing/V_s)`` if smoothing > 0.
        """
        if teacher_logits.shape[-1] != self.teacher_size:
            raise ValueError(f"teacher_logits last dim {teacher_logits.shape[-1]} != teacher vocabulary size "
                             f"{self.teacher_size}")
        if not teacher_logits.dtype.is_floating_point:
            raise ValueError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing!r}")
        if not all_finite(teacher_logits):
            raise ValueError("teacher_logits contain NaN or inf")
        lead = teacher_logits.shape[:-1]
        lsm = torch.log_softmax(teacher_logits.reshape(-1, self.teacher_size), dim=-1)
        plan = {k: v.to(lsm.device) for k, v in self._plan.items()}
        out = lsm.index_select(1, plan["source"]).index_fill_(1, plan["uncovered"], -math.inf)
        if plan["shared_teacher"].numel():  # student ids with several sources: log Σ exp over their teacher ids
            part = lsm.index_select(1, plan["shared_teacher"])
            top = part.amax(dim=-1, keepdim=True).detach()
            mass = part.new_zeros(part.shape[0], plan["shared_student"].numel()).index_add_(
                1, plan["shared_group"], (part - top).exp())
            out = out.index_copy_(1, plan["shared_student"], mass.log() + top)
        if smoothing > 0.0:
            if out.requires_grad:
                out = torch.log(out.exp() * (1.0 - smoothing) + smoothing / self.student_size)
            else:  # no autograd (teachers run under no_grad): the same in place
                out = out.exp_().mul_(1.0 - smoothing).add_(smoothing / self.student_size).log_()
        return out.reshape(*lead, self.student_size)

    @functools.cached_property
    def _plan(self) -> dict[str, Tensor]:
        """Index plan of :meth:`logprobs`: ``source[s]`` (the teacher id of a single-source student id),
        ``uncovered`` (student ids without a source), and the shared ids: ``shared_teacher`` (teacher ids whose student id has
        several sources), ``shared_group`` (their group), ``shared_student`` (the group's student id)."""
        counts = torch.bincount(self.index.cpu(), minlength=self.student_size)
        source = torch.zeros(self.student_size, dtype=torch.long).scatter_(0, self.index.cpu(),
                                                                          torch.arange(self.teacher_size))
        shared_student = (counts > 1).nonzero()[:, 0]
        shared_teacher = torch.isin(self.index.cpu(), shared_student).nonzero()[:, 0]
        group = torch.searchsorted(shared_student, self.index.cpu()[shared_teacher])
        return {"source": source, "uncovered": (counts == 0).nonzero()[:, 0], "shared_teacher": shared_teacher,
                "shared_group": group, "shared_student": shared_student}


def build_vocab_map(teacher_vocab: VocabLike, student_vocab: VocabLike, *, student_unk: str,
                    teacher_unk: str | None = None, teacher_size: int | None = None,
                    normalize: Callable[[str], str] | None = None) -> VocabMap:
    """Build the teacher → student map by (normalised) token string.

    Args:
        teacher_vocab: teacher tokens in id order, or a dict token → id (``tokenizer.get_vocab()``).
        student_vocab: student tokens in id order, or a dict token → id.
        student_unk: the student token that receives the teacher's unmatched (tail) mass.
        teacher_unk: the teacher token fed in place of student tokens the teacher lacks; defaults to
            ``student_unk`` if the teacher has it, else teacher id 0.
        teacher_size: width of the teacher's logits when it exceeds the vocabulary (models often pad their
            output layer); the extra ids go to the tail bucket.
        normalize: applied to teacher token strings before matching (e.g. :func:`strip_subword_markers`). Several
            teacher tokens may map to one student token; their probabilities add up.

    Raises:
        ValueError: if ``student_unk`` / ``teacher_unk`` is not in its vocabulary, or a vocabulary is empty or
            has repeated tokens.
    """
    t_itos = _as_itos(teacher_vocab, "teacher_vocab", teacher_size)
    s_itos = _as_itos(student_vocab, "student_vocab")
    for name, itos in (("teacher_vocab", t_itos), ("student_vocab", s_itos)):
        named = [t for t in itos if t is not None]
        if not named:
            raise ValueError(f"{name} is empty")
        if len(set(named)) != len(named):
            raise ValueError(f"{name} has repeated tokens")
    if None in s_itos:
        raise ValueError("student_vocab: ids must be 0..n-1 without gaps")
    s_stoi = {t: i for i, t in enumerate(s_itos)}
    if student_unk not in s_stoi:
        raise ValueError(f"student_unk {student_unk!r} is not in student_vocab")
    unk = s_stoi[student_unk]
    t_stoi = {t: i for i, t in enumerate(t_itos) if t is not None}
    if teacher_unk is None:
        t_unk = t_stoi.get(student_unk, 0)
    elif teacher_unk not in t_stoi:
        raise ValueError(f"teacher_unk {teacher_unk!r} is not in teacher_vocab")
    else:
        t_unk = t_stoi[teacher_unk]

    norm = normalize or (lambda s: s)
    index = torch.full((len(t_itos),), unk, dtype=torch.long)
    encode_index = torch.full((len(s_itos),), t_unk, dtype=torch.long)
    covered = torch.zeros(len(s_itos), dtype=torch.bool)
    exact = set()
    for j, tok in enumerate(t_itos):
        s = None if tok is None else s_stoi.get(norm(tok))
        if s is None:
            continue
        index[j] = s
        covered[s] = True
        # Inputs prefer the un-normalised exact string, else the first teacher token that normalises to it.
        if tok in s_stoi or s not in exact:
            encode_index[s] = j
            if tok in s_stoi:
                exact.add(s)
    encode_index[unk] = t_unk
    vmap = VocabMap(index, encode_index, covered, len(s_itos), unk)
    logger.info("vocab map: %d teacher tokens -> %d student tokens, student coverage %.3f",
                vmap.teacher_size, vmap.student_size, vmap.coverage)
    return vmap


class MappedTeacher(nn.Module):
    """A teacher over its own vocabulary seen as a teacher over the student's.

    ``forward(student_ids [B, L]) -> [B, L, V_s]`` log-probabilities (valid logits): the ids are encoded with
    :meth:`VocabMap.encode`, passed positionally to ``model`` (the first argument of a ``transformers`` causal LM
    is ``input_ids``), the output's ``.logits`` is taken if present, and the result is mapped with
    :meth:`VocabMap.logprobs`.
    """

    def __init__(self, model: Callable[..., Any], vmap: VocabMap, *, smoothing: float = 1e-6) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.vmap = vmap
        self.smoothing = float(smoothing)
        self._checked = False

    def forward(self, student_ids: Tensor, **kwargs: Any) -> Tensor:
        if not self._checked:  # once: the teacher reads such tokens as its own UNK token, out of context
            self._checked = True
            lost = ~self.vmap.covered.to(student_ids.device)[student_ids.long()] | (student_ids == self.vmap.unk_id)
            n = int(lost.sum())
            if n:
                warnings.warn(f"MappedTeacher: {n} input token(s) are the student's UNK or absent from the teacher's "
                              f"vocabulary; the teacher reads them as its token id "
                              f"{int(self.vmap.encode_index[self.vmap.unk_id])}, so its distributions after them are "
                              "unreliable. Where the text is available, run the teacher on its own tokenization "
                              "(safekd cache-teachers maps it to the student's positions).", UserWarning, stacklevel=2)
        teacher_ids = self.vmap.encode(student_ids)
        out = self.model(teacher_ids, **kwargs)
        logits = getattr(out, "logits", out)
        if not isinstance(logits, Tensor):
            raise TypeError(f"teacher model returned {type(out).__name__}; expected a Tensor or an object with .logits")
        return self.vmap.logprobs(logits, smoothing=self.smoothing)
