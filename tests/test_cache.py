"""Teacher caches: round trip, exact unsafe mass, offset alignment of a foreign tokenizer, refusals, resume, CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from safekd.cache import CacheMismatchError, TeacherCache, TeacherSource, cache_teachers, tokenize_texts  # noqa: E402
from safekd.cli import build_parser, main  # noqa: E402
from safekd.spec import Spec, TeacherSpec  # noqa: E402
from safekd.unsafe import UnsafeSet  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog ate the bone", "cats and dogs play all day", "the sun is hot today",
         "we read a good book", "rain on the red roof"]
UNSAFE = [70, 71, 72, 260]


def bpe(size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


STUDENT = bpe(300)
CHARS = bpe(257)  # bytes only: a teacher whose tokens end at every character


class Table(torch.nn.Module):
    """A deterministic teacher: logits = a random table row per input id."""

    def __init__(self, V: int, seed: int, fail_at: int | None = None) -> None:
        super().__init__()
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3
        self.calls, self.fail_at = 0, fail_at

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt  # an interrupted run
        return self.table[ids]


def _spec(names=("a", "b"), unsafe=UNSAFE) -> Spec:
    return Spec(teachers=[TeacherSpec(n) for n in names], unsafe=unsafe)


def _data(seq_len: int = 8):
    return tokenize_texts(TEXTS, STUDENT, seq_len)


def _run(out, teachers, k=300, **kw):
    V = len(STUDENT)
    return cache_teachers(out, _data(), teachers, k=k, vocab_size=V, unsafe=UnsafeSet(UNSAFE),
                          student_vocab=STUDENT.get_vocab(), **{"dtype": "fp32", "batch_size": 2, "shard_size": 2,
                                                                 **kw})


def test_round_trip_is_exact_at_k_equal_v_and_the_unsafe_mass_is_exact_at_small_k(tmp_path: Path) -> None:
    V = len(STUDENT)
    a, b = Table(V, 0), Table(V, 1)
    _run(tmp_path / "full", {"a": a, "b": b})
    _run(tmp_path / "top4", {"a": a, "b": b}, k=4, dtype="bf16")
    data = _data()
    dense = torch.log_softmax(torch.stack([a.table[data.input_ids], b.table[data.input_ids]], -2).double(), -1)
    full = list(TeacherCache(tmp_path / "full", spec=_spec(), vocab=STUDENT, batch_size=4))
    assert len(full) == len(TeacherCache(tmp_path / "full", batch_size=4)) == 3  # 3 shards of 2 examples
    ids = torch.cat([x["teacher_topk_ids"] for x in full]).long()
    lp = torch.cat([x["teacher_topk_logprobs"] for x in full]).double()
    torch.testing.assert_close(dense.gather(-1, ids), lp, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([x["inputs"] for x in full]), data.input_ids)
    assert bool((torch.cat([x["labels"] for x in full])[:, -1] == -100).all())
    top = list(TeacherCache(tmp_path / "top4", spec=_spec()))
    assert top[0]["teacher_topk_logprobs"].dtype == torch.bfloat16 and top[0]["teacher_topk_ids"].shape[-1] == 4
    mass = torch.cat([x["teacher_unsafe_mass"] for x in top])
    assert mass.dtype == torch.float64
    torch.testing.assert_close(mass, UnsafeSet(UNSAFE).mass(dense, teacher_axis=True), rtol=0, atol=1e-12)


def test_a_teacher_with_another_tokenizer_reads_its_own_tokens_aligned_by_offsets(tmp_path: Path) -> None:
    V = len(STUDENT)
    chars = Table(len(CHARS), 2)
    _run(tmp_path / "c", {"a": Table(V, 0), "b": TeacherSource(chars, CHARS, "chars")})
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["teachers"][1]["mapped"] and m["exact_alignment"] == {"b": 1.0}
    data = _data()
    got = torch.cat([x["teacher_topk_logprobs"] for x in TeacherCache(tmp_path / "c")])[..., 1, :].double()
    ids = torch.cat([x["teacher_topk_ids"] for x in TeacherCache(tmp_path / "c")])[..., 1, :].long()
    s_vocab, c_vocab = STUDENT.get_vocab(), CHARS.get_vocab()
    for i, text in enumerate(TEXTS):
        for t in range(int(data.attention_mask[i].sum())):
            end = int(data.offsets[i, t, 1])
            char_ids = torch.tensor(CHARS(text[:end], add_special_tokens=False)["input_ids"])
            lp_t = torch.log_softmax(chars.table[char_ids[-1]].double(), -1)  # next character after the prefix
            for tok, j in c_vocab.items():
                if tok in s_vocab and tok != "<|endoftext|>":
                    where = (ids[i, t] == s_vocab[tok]).nonzero()
                    assert float(got[i, t, where[0, 0]]) == pytest.approx(float(lp_t[j]), abs=1e-5)


def test_a_cache_for_other_teachers_unsafe_set_or_vocabulary_is_refused(tmp_path: Path) -> None:
    V = len(STUDENT)
    _run(tmp_path / "c", {"a": Table(V, 0), "b": Table(V, 1)})
    with pytest.raises(CacheMismatchError, match="same order"):
        TeacherCache(tmp_path / "c", spec=_spec(("b", "a")))
    with pytest.raises(CacheMismatchError, match="another unsafe set"):
        TeacherCache(tmp_path / "c", spec=_spec(unsafe=[70, 71]))
    with pytest.raises(CacheMismatchError, match="another student vocabulary"):
        TeacherCache(tmp_path / "c", vocab=CHARS)
    with pytest.raises(CacheMismatchError, match="other settings.*k"):
        _run(tmp_path / "c", {"a": Table(V, 0), "b": Table(V, 1)}, k=8)


def test_an_interrupted_run_resumes_and_keeps_its_completed_shards(tmp_path: Path) -> None:
    V = len(STUDENT)
    _run(tmp_path / "ref", {"a": Table(V, 0), "b": Table(V, 1)})
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "c", {"a": Table(V, 0, fail_at=3), "b": Table(V, 1)})
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not m["complete"] and m["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(CacheMismatchError, match="incomplete"):
        TeacherCache(tmp_path / "c")
    first = (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns
    a = Table(V, 0)
    _run(tmp_path / "c", {"a": a, "b": Table(V, 1)})
    assert a.calls == 1  # only the missing shard ran
    assert (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns == first
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_cli_documents_every_flag_caches_and_refuses_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["cache-teachers"]
    text = sub.format_help()
    for action in sub._actions:
        assert action.help and all(opt in text for opt in action.option_strings)
    (tmp_path / "teachers_mod.py").write_text(
        "import torch\n"
        f"table = torch.randn({len(STUDENT)}, {len(STUDENT)}, generator=torch.Generator().manual_seed(0))\n"
        "def a(ids):\n    return table[ids]\n"
        "def b(ids):\n    return 2 * table[ids]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    STUDENT.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    (tmp_path / "spec.yaml").write_text("teachers: [{name: a}, {name: b}]\nunsafe: {ids: [70, 71]}\n")
    args = ["cache-teachers", "--spec", str(tmp_path / "spec.yaml"), "--teacher", "a=teachers_mod:a",
            "--teacher", "b=teachers_mod:b", "--text", str(tmp_path / "data.jsonl"), "--tokenizer",
            str(tmp_path / "tok"), "--out", str(tmp_path / "cache"), "--k", "8", "--seq-len", "6", "--no-progress"]
    assert main(args) == 0
    assert "teacher cache" in capsys.readouterr().out
    assert len(list(TeacherCache(tmp_path / "cache", batch_size=6))) == 1
    assert main(args[:-3] + ["--k", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings" in err and "Traceback" not in err
    assert main(args[:4] + ["--teacher", "a"] + args[6:]) == 2
    assert "NAME=SOURCE" in capsys.readouterr().err
    sys.modules.pop("teachers_mod", None)


def test_a_derived_teacher_shares_its_base_forward_while_caching(tmp_path: Path) -> None:
    from safekd.teachers import derived

    a = Table(len(STUDENT), 0)
    _run(tmp_path / "c", {"a": a, "b": derived(a, lambda z: 2 * z)}, k=4)
    assert a.calls == 3  # one forward per batch (3 batches), not two
    batch = next(iter(TeacherCache(tmp_path / "c")))
    lp = torch.log_softmax(2 * a.table[batch["inputs"]], -1)
    torch.testing.assert_close(lp.gather(-1, batch["teacher_topk_ids"][..., 1, :].long()),
                               batch["teacher_topk_logprobs"][..., 1, :], rtol=0, atol=1e-5)
