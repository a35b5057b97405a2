"""Teacher caches: run the teachers once over a tokenized data set, keep each token's top-k teacher distribution,
and stream it back as batches of the batch protocol (``teacher_topk_ids``, ``teacher_topk_logprobs``,
``teacher_unsafe_mass``; see ``docs/architecture.md``).

A cache is a directory: ``manifest.json`` plus shards ``shard-00000.safetensors``, ... Each shard holds, for
``n`` examples of ``L`` student tokens and K teachers: ``inputs [n, L]`` (student ids), ``labels [n, L]`` (the
next token; ``-100`` where not counted), ``mask [n, L]``, ``teacher_topk_ids [n, L, K, k]`` (int32),
``teacher_topk_logprobs [n, L, K, k]`` (bf16 or fp32) and ``teacher_unsafe_mass [n, L, K]`` (float64, exact:
computed from the full distribution before it is cut to the top-k).

Why safetensors: it is the format the Hugging Face ecosystem already reads (``safetensors``, ``transformers``,
``accelerate``, and numpy/JAX loaders), it stores typed tensors (int32 ids, bf16 log-probs) without pickle, so a
cache from elsewhere cannot run code when it is loaded, and files are memory-mapped, so reading a shard costs
only the rows taken. Arrow suits tables of text; a cache is tensors.

A cache is refused (:class:`CacheMismatchError`) when it was built for other teachers, another teacher order,
another unsafe set or another student vocabulary than the run reading it. Writing resumes: completed shards are
kept (each shard and the manifest are written atomically), so an interrupted ``safekd cache-teachers`` run
continues where it stopped when it is run again with the same settings.

Teachers whose tokenizer differs from the student's are run on **their own tokenization of the text** and
aligned to the student's positions by character offsets: the student position ending at character e reads the
teacher position whose prefix ends at e (the last one ending before e where none ends there, or the last one
within the teacher's context length), and its distribution is mapped onto the student vocabulary with
:meth:`safekd.vocab.VocabMap.logprobs`; the manifest records the fraction of positions aligned exactly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safekd.common.batches import IGNORE_INDEX
from safekd.targets.sparse import topk_logprobs
from safekd.targets.teachers import logits_of, teacher_outputs
from safekd.spec.unsafe import UnsafeSet
from safekd.targets.vocab import VocabMap, build_vocab_map

__all__ = ["TeacherSource", "TokenizedText", "TeacherCache", "CacheMismatchError", "cache_teachers",
           "tokenize_texts", "vocab_hash", "unsafe_hash", "FORMAT"]

logger = logging.getLogger(__name__)

FORMAT, VERSION = "safekd-teacher-cache", 1
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_UNK_TOKENS = ("<unk>", "<|endoftext|>", "</s>", "[UNK]")  # student token that takes a mapped teacher's tail


class CacheMismatchError(ValueError):
    """A cache that does not belong to this run (teachers, unsafe set, vocabulary, settings) or is incomplete."""


def vocab_hash(vocab: Mapping[str, int] | Sequence[str]) -> str:
    """sha256 of a vocabulary (``token -> id`` dict or id-ordered tokens), independent of dict order."""
    items = sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, Mapping) else list(enumerate(vocab))
    return hashlib.sha256(json.dumps([[str(a), str(b)] for a, b in items]).encode()).hexdigest()


def unsafe_hash(unsafe: UnsafeSet | None) -> str | None:
    """sha256 of the unsafe ids (None without an unsafe set).

    Raises:
        ValueError: a mask-callable unsafe set (a cache needs the ids).
    """
    if unsafe is None:
        return None
    if unsafe.ids is None:
        raise ValueError(f"a teacher cache needs an unsafe set given by token ids, got {unsafe!r}")
    return hashlib.sha256(json.dumps(unsafe.ids.tolist()).encode()).hexdigest()


@dataclass
class TeacherSource:
    """A teacher as the cache runs it: ``model(input_ids [B, L]) -> logits`` (or an output with ``.logits``) and,
    when its tokenizer differs from the student's, that ``tokenizer`` (a Hugging Face fast tokenizer); ``source``
    names it in the manifest (e.g. ``hf:HuggingFaceTB/SmolLM2-135M``)."""

    model: Callable[..., Any]
    tokenizer: Any = None
    source: str = ""


@dataclass
class TokenizedText:
    """The student's tokenization of ``texts``: ``input_ids``/``attention_mask`` ``[N, L]`` and the character
    span of each token, ``offsets [N, L, 2]`` (used to align teachers with other tokenizers)."""

    texts: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    offsets: Tensor


def tokenize_texts(texts: Sequence[str], tokenizer: Any, seq_len: int) -> TokenizedText:
    """Tokenize ``texts`` with the student's (fast) ``tokenizer``, truncated and right-padded to ``seq_len``.

    Raises:
        ValueError: no texts, ``seq_len < 2``, or a tokenizer without character offsets (a slow tokenizer).
    """
    if not texts:
        raise ValueError("no texts to cache")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a position predicts the next token), got {seq_len}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the tokenizer must be a fast (Rust) Hugging Face tokenizer: offsets are needed")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=seq_len,
                    return_offsets_mapping=True)
    n = len(texts)
    ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attn = torch.zeros(n, seq_len, dtype=torch.long)
    offsets = torch.zeros(n, seq_len, 2, dtype=torch.long)
    for i, (row, off) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, :len(row)] = 1
        if row:
            offsets[i, :len(row)] = torch.tensor(off, dtype=torch.long)
    return TokenizedText(list(texts), ids, attn, offsets)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _vocab_of(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


class _Runner:
    """Runs one teacher on a slice of the data set and returns its logits over the student vocabulary ``[n, L, V]``
    (extra output rows beyond V, e.g. a padded LM head, are dropped), or, for a teacher with its own tokenizer,
    its log-probabilities mapped onto that vocabulary after offset alignment (float32)."""

    def __init__(self, name: str, t: TeacherSource, student_vocab: dict[str, int] | None, V: int,
                 device: torch.device) -> None:
        self.name, self.t, self.V, self.device = name, t, V, device
        self.vmap: VocabMap | None = None
        if t.tokenizer is not None and student_vocab is not None and _vocab_of(t.tokenizer) != student_vocab:
            unk = next((tok for tok in _UNK_TOKENS if tok in student_vocab), None)
            if unk is None:
                raise ValueError(f"teacher {name!r} has another tokenizer, and the student vocabulary has none of "
                                 f"{list(_UNK_TOKENS)} to receive the teacher's unmatched mass")
            self.vmap = build_vocab_map(_vocab_of(t.tokenizer), student_vocab, student_unk=unk).to(device)
        self.aligned = self.positions = 0
        # a teacher reads at most its context length (Hugging Face config), counted as inexact beyond it
        self.max_len = getattr(getattr(t.model, "config", None), "max_position_embeddings", None)

    def __call__(self, data: TokenizedText, rows: slice, shared: Mapping[str, Tensor]) -> Tensor:
        """``shared``: the outputs of the teachers that read the student's ids, from one
        :func:`~safekd.teachers.teacher_outputs` call (derived teachers share their base's forward)."""
        if self.vmap is None:
            z, ids = shared[self.name], data.input_ids[rows]
            if z.shape[-1] < self.V or z.shape[:-1] != ids.shape:
                raise ValueError(f"teacher {self.name!r} returned logits {tuple(z.shape)}; expected "
                                 f"[{ids.shape[0]}, {ids.shape[1]}, V >= {self.V}] over the student's vocabulary")
            return z[..., :self.V]  # logits: topk_logprobs normalises them (p_k(U) in float64)
        t_ids, pos = self._align(data, rows)
        z = logits_of(self.t.model(t_ids.to(self.device)), f"teacher {self.name!r}")
        z = z.gather(1, pos.to(self.device).unsqueeze(-1).expand(*pos.shape, z.shape[-1]))
        return self.vmap.logprobs(z.float())

    def _align(self, data: TokenizedText, rows: slice) -> tuple[Tensor, Tensor]:
        """The teacher's ids ``[n, L_t]`` for the text the student saw, and for each student position the teacher
        position whose prefix ends where the student's does (else the last one ending before it)."""
        texts = data.texts[rows]
        ends = data.offsets[rows][..., 1]
        attn = data.attention_mask[rows].bool()
        cut = [t[:int(e[a].max()) if bool(a.any()) else 0] for t, e, a in zip(texts, ends, attn)]
        enc = self.t.tokenizer(cut, add_special_tokens=False, return_offsets_mapping=True)
        Lt = max(1, max(len(r) for r in enc["input_ids"]))
        if self.max_len:
            Lt = min(Lt, int(self.max_len))
        t_ids = torch.zeros(len(cut), Lt, dtype=torch.long)
        t_end = torch.full((len(cut), Lt), 2**62, dtype=torch.long)
        for i, (row, off) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            row, off = row[:Lt], off[:Lt]
            if row:
                t_ids[i, :len(row)] = torch.tensor(row)
                t_end[i, :len(row)] = torch.tensor([o[1] for o in off])
        t_end = t_end.cummax(-1).values  # non-decreasing for searchsorted
        pos = torch.searchsorted(t_end, ends.contiguous(), right=True) - 1
        exact = (t_end.gather(1, pos.clamp(0, Lt - 1)) == ends) & (pos < Lt) & attn
        self.aligned += int(exact.sum())
        self.positions += int(attn.sum())
        return t_ids, pos.clamp(0, Lt - 1)


def cache_teachers(out: str | Path, data: TokenizedText, teachers: Mapping[str, TeacherSource | Callable[..., Any]],
                   *, k: int, vocab_size: int, unsafe: UnsafeSet | None = None,
                   student_vocab: Mapping[str, int] | None = None, dtype: str = "bf16", batch_size: int = 8,
                   shard_size: int = 1024, device: str | torch.device = "cpu", progress: bool = False) -> Path:
    """Run ``teachers`` (in their order: the spec's teacher order) over ``data`` and write the sharded cache at
    ``out``; returns the manifest's path. Resumes an interrupted run with the same settings (completed shards
    are kept).

    Args:
        data: the student's tokenization (:func:`tokenize_texts`); position t predicts token t+1.
        teachers: ``{name: TeacherSource or callable input_ids -> logits over the student's vocabulary}``.
        k: top-k kept per token and teacher (``k = vocab_size`` keeps whole distributions, exactly).
        vocab_size: V, the student's vocabulary size; ``student_vocab`` (``token -> id``) is hashed into the
            manifest and maps teachers with another tokenizer.
        unsafe: the spec's unsafe set (ids): its exact mass p_k(U) is stored per token and teacher.
        dtype: ``"bf16"`` (half the bytes) or ``"fp32"`` for the top-k log-probabilities.

    Raises:
        CacheMismatchError: ``out`` holds a cache with other settings.
        ValueError: bad arguments (named).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not teachers:
        raise ValueError("no teachers to cache")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must lie in [1, vocab_size={vocab_size}], got {k}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    from safetensors.torch import save

    out = Path(out)
    dev = torch.device(device)
    sources = {n: t if isinstance(t, TeacherSource) else TeacherSource(t, None, getattr(t, "__name__", type(t).__name__))
               for n, t in teachers.items()}
    svocab = dict(student_vocab) if student_vocab is not None else None
    runners = {n: _Runner(n, t, svocab, vocab_size, dev) for n, t in sources.items()}
    direct = [n for n, r in runners.items() if r.vmap is None]  # teachers reading the student's ids
    N, L = data.input_ids.shape
    data_hash = hashlib.sha256(data.input_ids.numpy().tobytes() + data.attention_mask.numpy().tobytes()).hexdigest()
    settings = {"format": FORMAT, "version": VERSION,
                "teachers": [{"name": n, "source": t.source,
                              "vocab_hash": None if t.tokenizer is None else vocab_hash(_vocab_of(t.tokenizer)),
                              "mapped": runners[n].vmap is not None} for n, t in sources.items()],
                "k": k, "dtype": dtype, "vocab_size": vocab_size,
                "student_vocab_hash": None if svocab is None else vocab_hash(svocab),
                "unsafe_hash": unsafe_hash(unsafe), "seq_len": L, "examples": N, "data_hash": data_hash,
                "shard_size": shard_size}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    done: list[str] = []
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        diff = sorted(key for key in settings if old.get(key) != settings[key])
        if diff:
            raise CacheMismatchError(f"{out} holds a teacher cache built with other settings ({', '.join(diff)}); "
                                     "choose another output directory or remove it")
        done = [s for s in old.get("shards", []) if (out / s).exists()]
    n_shards = (N + shard_size - 1) // shard_size
    todo = [i for i in range(n_shards) if f"shard-{i:05d}.safetensors" not in done]
    if done:
        logger.info("resuming %s: %d of %d shards already written", out, len(done), n_shards)
    labels = torch.cat([data.input_ids[:, 1:], data.input_ids.new_full((N, 1), IGNORE_INDEX)], dim=1)
    labels = labels.masked_fill(~torch.cat([data.attention_mask[:, 1:].bool(),
                                            torch.zeros(N, 1, dtype=torch.bool)], dim=1), IGNORE_INDEX)
    from tqdm.auto import tqdm

    bar = tqdm(total=N, initial=N - sum(min(shard_size, N - i * shard_size) for i in todo), unit="ex",
               desc="cache-teachers", disable=not progress)
    for i in todo:
        lo, hi = i * shard_size, min(N, (i + 1) * shard_size)
        parts: dict[str, list[Tensor]] = {"teacher_topk_ids": [], "teacher_topk_logprobs": [],
                                          "teacher_unsafe_mass": []}
        for s in range(lo, hi, batch_size):
            rows = slice(s, min(hi, s + batch_size))
            with torch.no_grad():
                ids = data.input_ids[rows].to(dev)
                shared = dict(zip(direct, teacher_outputs([sources[n].model for n in direct], ids, direct)))
                lp = torch.stack([run(data, rows, shared) for run in runners.values()], dim=-2)  # [n, L, K, V]
                sp = topk_logprobs(lp, k, unsafe)
            parts["teacher_topk_ids"].append(sp["teacher_topk_ids"].int().cpu())
            parts["teacher_topk_logprobs"].append(sp["teacher_topk_logprobs"].to(_DTYPES[dtype]).cpu())
            if unsafe is not None:
                parts["teacher_unsafe_mass"].append(sp["teacher_unsafe_mass"].cpu())
            bar.update(rows.stop - rows.start)
        shard = {"inputs": data.input_ids[lo:hi].contiguous(), "labels": labels[lo:hi].contiguous(),
                 "mask": data.attention_mask[lo:hi].bool().contiguous(),
                 **{key: torch.cat(v).contiguous() for key, v in parts.items() if v}}
        name = f"shard-{i:05d}.safetensors"
        _atomic_write(out / name, save(shard, metadata={"format": FORMAT}))
        done.append(name)
        alignment = {n: r.aligned / r.positions for n, r in runners.items() if r.vmap is not None and r.positions}
        _atomic_write(manifest_path, json.dumps({**settings, "shards": sorted(done),
                                                 "complete": len(done) == n_shards,
                                                 "exact_alignment": alignment}, indent=2).encode())
    bar.close()
    return manifest_path


class TeacherCache:
    """A teacher cache read back as an iterable of protocol batches (re-iterable: one pass per epoch).

    Args:
        path: the cache directory (or its ``manifest.json``).
        spec: the run's :class:`~safekd.spec.Spec`: the cache must hold its teachers in its order and its unsafe
            set (by hash).
        vocab: the student's vocabulary (``token -> id``) or tokenizer, checked against the cache's hash.
        batch_size: examples per batch (default 8); a batch never spans two shards.
        device: where the tensors go.

    Raises:
        CacheMismatchError: an incomplete cache, or one built for other teachers, another unsafe set or another
            vocabulary (the message names what differs).
    """

    def __init__(self, path: str | Path, *, spec: Any = None, vocab: Any = None, batch_size: int = 8,
                 device: str | torch.device | None = None) -> None:
        path = Path(path)
        self.dir = path.parent if path.name == "manifest.json" else path
        mpath = self.dir / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(str(mpath))
        m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CacheMismatchError(f"{self.dir} is not a safekd teacher cache of version {VERSION}")
        if not m.get("complete"):
            raise CacheMismatchError(f"the teacher cache at {self.dir} is incomplete ({len(m.get('shards', []))} "
                                     "shards written): run the same `safekd cache-teachers` command again to resume")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = [t["name"] for t in m["teachers"]]
        if spec is not None:
            if list(spec.teacher_names) != names:
                raise CacheMismatchError(f"the cache holds teachers {names}, the spec {list(spec.teacher_names)} "
                                         "(same names in the same order are needed)")
            want = unsafe_hash(spec.unsafe)
            if want != m["unsafe_hash"]:
                raise CacheMismatchError(
                    f"the cache was built with {'no' if m['unsafe_hash'] is None else 'another'} unsafe set "
                    f"(hash {str(m['unsafe_hash'])[:12]}), the spec has "
                    f"{'none' if want is None else 'hash ' + want[:12]}: its p_k(U) would be wrong; rebuild the cache")
        if vocab is not None:
            v = _vocab_of(vocab) if hasattr(vocab, "get_vocab") else vocab
            if vocab_hash(v) != m["student_vocab_hash"]:
                raise CacheMismatchError(f"the cache was built for another student vocabulary (hash "
                                         f"{str(m['student_vocab_hash'])[:12]}, this one {vocab_hash(v)[:12]})")
        self.manifest, self.teacher_names, self.batch_size = m, names, batch_size
        self.device = None if device is None else torch.device(device)

    def __len__(self) -> int:
        sizes = [min(self.manifest["shard_size"], self.manifest["examples"] - i * self.manifest["shard_size"])
                 for i in range(len(self.manifest["shards"]))]
        return sum((s + self.batch_size - 1) // self.batch_size for s in sizes)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        from safetensors import safe_open

        for name in self.manifest["shards"]:
            with safe_open(str(self.dir / name), framework="pt") as f:
                keys = list(f.keys())
                n = f.get_slice("inputs").get_shape()[0]
                for s in range(0, n, self.batch_size):
                    batch = {key: f.get_slice(key)[s:s + self.batch_size] for key in keys}
                    yield {key: t.to(self.device) if self.device is not None else t for key, t in batch.items()}
