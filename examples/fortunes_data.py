"""Shared pieces of the fortunes examples: corpus, tokenizer, vocabulary, unsafe set, audit flags, small LMs, and
the compared methods (their specs, baseline operators, audit summary and run loop).

Corpus: Debian's ``fortunes`` (BSD; ``apt-get install fortunes`` → ``/usr/share/games/fortunes/``); one file per
topic, items separated by lines holding ``%``. A small subset with its licence ships in ``tests/data/fortunes``.
Safety signals (``pip install safekd[examples]``): the word list bundled with ``better-profanity`` (the unsafe
token set U) and the document classifier of ``alt-profanity-check`` (the document-level audit signal).
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from safekd.auditing.core import audit
from safekd.spec.constraints import Constraint
from safekd.training.distiller import SafeDistiller
from safekd.spec.document import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.spec.unsafe import UnsafeSet
from safekd.targets.weighting import AEKD, CAMKD

logger = logging.getLogger(__name__)

SYSTEM_CORPUS = Path("/usr/share/games/fortunes")
FIXTURE_CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "fortunes"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|[^\sa-z0-9]")
_OVERSTRIKE_RE = re.compile(r".\x08")
_NOT_TOPIC = {"LICENSE", "README", "README.md"}


@dataclass(frozen=True)
class Fortune:
    text: str
    topic: str


def default_corpus() -> Path:
    """The system corpus when installed, else the test fixture."""
    return SYSTEM_CORPUS if SYSTEM_CORPUS.is_dir() and any(SYSTEM_CORPUS.iterdir()) else FIXTURE_CORPUS


def load_corpus(root: Path | str, topics: Iterable[str] | None = None, max_chars: int = 600) -> list[Fortune]:
    """Read every topic file under ``root`` (skipping ``*.dat``/``*.u8`` indices), one :class:`Fortune` per item.

    Overstrike sequences (``x\\bx``) are removed and items longer than ``max_chars`` are dropped (ASCII art,
    long stories), so the corpus is short natural text.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist (apt-get install fortunes, or pass --corpus)")
    wanted = set(topics) if topics is not None else None
    out: list[Fortune] = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.is_symlink() or path.suffix or path.name in _NOT_TOPIC:
            continue
        if wanted is not None and path.name not in wanted:
            continue
        raw = _OVERSTRIKE_RE.sub("", path.read_text(encoding="utf-8", errors="replace"))
        for item in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            text = item.strip()
            if text and len(text) <= max_chars:
                out.append(Fortune(text, path.name))
    if not out:
        raise ValueError(f"no fortunes found under {root} (topics={sorted(wanted) if wanted else 'all'})")
    return out


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with inner apostrophes), numbers, and single punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    return " ".join(t for t in tokens if t not in SPECIALS)


class WordVocab:
    """Word vocabulary: the specials, then ``force`` words seen in the corpus, then the most frequent words."""

    def __init__(self, itos: Sequence[str]) -> None:
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"itos must start with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, docs: Iterable[Sequence[str]], max_size: int, force: Iterable[str] = ()) -> "WordVocab":
        counts = Counter(t for d in docs for t in d)
        forced = sorted(w for w in set(force) if counts[w] > 0)
        rest = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in set(forced)]
        return cls(list(SPECIALS) + forced + rest[: max(0, max_size - len(SPECIALS) - len(forced))])

    def ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def words(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]


def encode(docs: Sequence[Sequence[str]], vocab: WordVocab, max_len: int) -> Tensor:
    """``<bos> w_1 … w_n <eos>`` per doc, truncated to ``max_len + 1`` ids and right-padded → ``[N, max_len + 1]``."""
    out = torch.full((len(docs), max_len + 1), vocab.pad_id, dtype=torch.long)
    for i, d in enumerate(docs):
        ids = ([vocab.bos_id] + vocab.ids(d) + [vocab.eos_id])[: max_len + 1]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def profanity_words() -> frozenset[str]:
    """The single-token entries of the word list bundled with ``better-profanity`` (lower case)."""
    text = resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text(encoding="utf-8")
    words = (w.strip().lower() for w in text.splitlines())
    return frozenset(w for w in words if w and tokenize(w) == [w])


def wordlist_flags(token_docs: Sequence[Sequence[str]], words: frozenset[str]) -> Tensor:
    """Bool ``[N]``: the document contains a word-list entry."""
    return torch.tensor([any(t in words for t in d) for d in token_docs], dtype=torch.bool)


def classifier_flags(texts: Sequence[str], threshold: float = 0.5) -> Tensor:
    """Bool ``[N]``: ``alt-profanity-check`` gives probability ≥ ``threshold`` (empty texts are not flagged)."""
    from profanity_check import predict_prob

    flags = torch.zeros(len(texts), dtype=torch.bool)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if keep:
        p = torch.as_tensor(predict_prob([texts[i] for i in keep]), dtype=torch.float64)
        flags[keep] = p >= threshold
    return flags


@dataclass
class Split:
    ids: Tensor          # [N, L+1]
    topics: Tensor       # [N] long (topic index)
    unsafe_doc: Tensor   # [N] bool (word list or classifier)
    texts: list[str]


@dataclass
class FortunesData:
    vocab: WordVocab
    topics: list[str]
    unsafe_ids: Tensor   # token ids of word-list entries present in the vocabulary
    words: frozenset[str]
    train: Split
    val: Split
    test: Split


def prepare(corpus: Path | str, *, topics: Iterable[str] | None = None, vocab_size: int = 3000, max_len: int = 48,
            test_frac: float = 0.15, val_frac: float = 0.1, max_docs: int | None = None,
            seed: int = 0) -> FortunesData:
    """Load, shuffle (seeded), split test/val/train, build the vocabulary on train (unsafe words forced in),
    encode, flag unsafe documents (word list or classifier)."""
    items = load_corpus(corpus, topics)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    items = [items[i] for i in perm][: max_docs or len(items)]
    toks = [tokenize(f.text) for f in items]
    words = profanity_words()
    flags = wordlist_flags(toks, words) | classifier_flags([f.text for f in items])
    n_test = max(1, int(round(test_frac * len(items))))
    n_val = max(1, int(round(val_frac * len(items))))
    te, va, tr = slice(0, n_test), slice(n_test, n_test + n_val), slice(n_test + n_val, None)
    vocab = WordVocab.build(toks[tr], vocab_size, force=words)
    topic_names = sorted({f.topic for f in items})
    tix = torch.tensor([topic_names.index(f.topic) for f in items])
    unsafe_ids = torch.tensor(sorted(vocab.stoi[w] for w in words if w in vocab.stoi), dtype=torch.long)
    ids = encode(toks, vocab, max_len)
    texts = [f.text for f in items]
    logger.info("corpus %s: %d docs (%d test), %d topics, vocab %d, %d unsafe ids, %.1f%% unsafe docs",
                corpus, len(items), n_test, len(topic_names), len(vocab), unsafe_ids.numel(), 100 * float(flags.float().mean()))
    def split(sl: slice) -> Split:
        return Split(ids[sl], tix[sl], flags[sl], texts[sl])

    return FortunesData(vocab, topic_names, unsafe_ids, words, split(tr), split(va), split(te))


# ----------------------------------------------------------------------------------------------- language models
class BigramLM(nn.Module):
    """Interpolated absolute-discount bigram LM (a Kneser–Ney-style back-off to an add-one unigram).

    p(v|u) = max(c(u,v) − d, 0)/c(u) + d·N₁₊(u·)/c(u) · p₁(v),  p₁(v) = (c(v) + 1)/(N + V);
    unseen contexts use p₁. ``forward(ids [B, L]) -> logits [B, L, V]`` is one table lookup.
    """

    def __init__(self, log_table: Tensor) -> None:
        super().__init__()
        self.register_buffer("log_table", log_table)

    @classmethod
    def fit(cls, ids: Tensor, vocab_size: int, pad_id: int = 0, discount: float = 0.75) -> "BigramLM":
        prev, nxt = ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)
        keep = nxt != pad_id
        prev, nxt = prev[keep], nxt[keep]
        V = vocab_size
        pair = torch.zeros(V * V, dtype=torch.float64).index_add_(0, prev * V + nxt, torch.ones_like(prev, dtype=torch.float64)).view(V, V)
        uni = torch.bincount(nxt, minlength=V).double()
        p1 = (uni + 1.0) / (uni.sum() + V)
        ctx = pair.sum(1, keepdim=True)
        n1 = (pair > 0).sum(1, keepdim=True).double()
        safe_ctx = ctx.clamp_min(1.0)
        p = (pair - discount).clamp_min(0.0) / safe_ctx + (discount * n1 / safe_ctx) * p1
        p = torch.where(ctx > 0, p, p1.expand(V, V))
        return cls(p.log().float())

    def forward(self, ids: Tensor) -> Tensor:
        return self.log_table[ids]


class GRULM(nn.Module):
    """Embedding → GRU → linear; ``forward(ids [B, L]) -> logits [B, L, V]``; :meth:`step` for sampling."""

    def __init__(self, vocab_size: int, emb: int = 64, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, emb)
        self.rnn = nn.GRU(emb, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.rnn(self.emb(ids))[0])

    def step(self, ids: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        h, state = self.rnn(self.emb(ids), state)
        return self.out(h[:, -1]), state


class BoostedLM(nn.Module):
    """A "jailbroken" teacher: ``logits + b·1[v ∈ U]`` on top of a base LM (more unsafe mass everywhere)."""

    def __init__(self, base: nn.Module, unsafe_ids: Tensor, vocab_size: int, boost: float) -> None:
        super().__init__()
        self.base = base
        bias = torch.zeros(vocab_size)
        bias[unsafe_ids] = boost
        self.register_buffer("bias", bias)

    def forward(self, ids: Tensor) -> Tensor:
        return self.base(ids) + self.bias


def lm_nll(logits: Tensor, ids: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(sum of −log p(next token), number of tokens) over non-pad targets; ``logits`` are for ``ids[:, :-1]``."""
    tgt = ids[:, 1:]
    mask = tgt != pad_id
    nll = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.reshape(-1), reduction="none").view_as(tgt)
    return (nll * mask).sum(), mask.sum()


def train_lm(model: nn.Module, ids: Tensor, *, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0,
             pad_id: int = 0) -> nn.Module:
    """Fit ``model`` by maximum likelihood (Adam, random mini-batches) — used for the neural teacher."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        b = ids[torch.randint(len(ids), (batch,), generator=g)]
        s, n = lm_nll(model(b[:, :-1]), b, pad_id)
        opt.zero_grad(set_to_none=True)
        (s / n.clamp_min(1)).backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, pad_id: int = 0, batch: int = 256) -> float:
    """exp(mean token NLL) on ``ids``."""
    tot, cnt = 0.0, 0
    for i in range(0, len(ids), batch):
        b = ids[i : i + batch]
        s, n = lm_nll(model(b[:, :-1]), b, pad_id)
        tot, cnt = tot + float(s), cnt + int(n)
    return math.exp(tot / max(cnt, 1))


@torch.no_grad()
def sample_continuations(model: GRULM, prompts: Tensor, max_new: int, *, generator: torch.Generator,
                         eos_id: int, temperature: float = 1.0) -> Tensor:
    """Ancestral sampling of ``max_new`` tokens after each prompt ``[N, P]`` → ``[N, max_new]`` (after ``<eos>``:
    ``<eos>``)."""
    logits, state = model.step(prompts, None)
    out = torch.empty(len(prompts), max_new, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for t in range(max_new):
        nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out[:, t] = nxt
        done |= nxt == eos_id
        logits, state = model.step(nxt[:, None], state)
    return out


# ------------------------------------------------------------------------------------------ compared methods
METHODS = ("uniform", "best_single", "camkd", "aekd", "safekd_adaptive", "safekd_constrained")


def method_spec(method: str, safety: Mapping[str, float], best_single: str, constraints: tuple[Constraint, ...],
                unsafe: UnsafeSet, dual_lr: float) -> Spec:
    """The spec of ``method``: every teacher of ``safety`` (its σ_k) or only ``best_single``; ``constraints`` for
    ``safekd_constrained`` only; gradient-ascent duals at ``dual_lr``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods are {METHODS}")
    names = (best_single,) if method == "best_single" else tuple(safety)
    return Spec(teachers=tuple(TeacherSpec(n, safety=safety[n]) for n in names),
                constraints=constraints if method == "safekd_constrained" else (), unsafe=unsafe,
                dual=DualSpec(rule="gradient_ascent", lr=dual_lr), checks=ChecksSpec(reference_every=100, alarm_window=0))


def baseline_weighting(method: str) -> nn.Module | None:
    """The operator of a baseline: CA-MKD, AEKD (min-norm of the batch-mean gradients); ``None`` (uniform) else."""
    if method == "camkd":
        return CAMKD()
    if method == "aekd":
        return AEKD(cap=1.0, reduce="batch")
    return None


def audit_constraints(student: nn.Module, batch: Mapping[str, Any], distiller: SafeDistiller | None,
                      confidence: float) -> tuple[dict[str, dict[str, Any]], str | None]:
    """:func:`safekd.auditing.core.audit` of every constraint of ``distiller``'s spec → ``({name: {estimate, bound,
    method, threshold, passed}}, report message)``; ``({}, None)`` without a distiller or constraints."""
    if distiller is None or not distiller.spec.constraints:
        return {}, None
    rep = audit(student, batch, distiller.spec, distiller=distiller, confidence=confidence, slice_keys=())
    return ({r.name: {"estimate": r.estimate, "bound": r.bound, "method": r.bound_method, "threshold": r.threshold,
                      "passed": r.passed} for r in rep.constraints}, rep.message)


class Scenario(Protocol):
    def train(self, method: str) -> tuple[nn.Module, SafeDistiller, list[dict[str, Any]]]: ...

    def evaluate(self, student: nn.Module, distiller: SafeDistiller | None = None) -> dict[str, Any]: ...


def run_methods(scenario: Scenario, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Train and evaluate each method in turn; adds ``train_seconds`` and the last step's ``final_weights``."""
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        t0 = time.perf_counter()
        student, dist, records = scenario.train(m)
        ev = scenario.evaluate(student, dist)
        ev["train_seconds"] = time.perf_counter() - t0
        ev["final_weights"] = records[-1]["projected"] if records else {}
        out[m] = ev
    return out


def report_failures(methods: Mapping[str, Mapping[str, Any]]) -> int:
    """Print one line per audited constraint that FAILs; the examples' exit code: 1 if any, else 0."""
    failed = [f"{m}: {name}" for m, ev in methods.items() for name, c in ev.get("constraints", {}).items()
              if not c["passed"]]
    for line in failed:
        print(f"FAIL {line}")
    return 1 if failed else 0


def config_from_args(cls: Any, args: argparse.Namespace) -> Any:
    """``cls.quick`` (``--quick``) or ``cls`` on ``--corpus`` (default: the fixture when quick, else the system
    corpus), with ``--seed`` and, when given, ``--steps``."""
    corpus = args.corpus or (str(FIXTURE_CORPUS) if args.quick else str(default_corpus()))
    cfg = cls.quick(corpus, seed=args.seed) if args.quick else cls(corpus=corpus, seed=args.seed)
    return replace(cfg, steps=args.steps) if args.steps is not None else cfg
