"""The fortunes examples on the shipped fixture: corpus, tokenizer, unsafe set, teachers, and quick end-to-end runs."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("better_profanity")
pytest.importorskip("profanity_check")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import fortunes_data as fd  # noqa: E402

FIXTURE = fd.FIXTURE_CORPUS


def test_fixture_ships_with_its_licence_and_parses():
    assert (FIXTURE / "LICENSE").read_text().count("Regents of the University of California") >= 1
    items = fd.load_corpus(FIXTURE)
    topics = {f.topic for f in items}
    assert topics == {"computers", "food", "kids", "love", "politics", "science"}   # LICENSE/README skipped
    assert len(items) == 414
    assert all("%" != f.text and "\x08" not in f.text for f in items)
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 300_000


def test_overstrike_removed_and_items_split(tmp_path):
    (tmp_path / "demo").write_text("b\bbold move\n%\nsecond\n  item\n%\n\n%\n")
    (tmp_path / "demo.dat").write_bytes(b"\x00\x01")
    items = fd.load_corpus(tmp_path)
    assert [f.text for f in items] == ["bold move", "second\n  item"]
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fd.load_corpus(tmp_path / "missing")


def test_tokenizer_vocab_and_unsafe_ids():
    assert fd.tokenize("Don't PANIC -- it's 42!") == ["don't", "panic", "-", "-", "it's", "42", "!"]
    words = fd.profanity_words()
    assert {"shit", "damn", "fuck"} <= words and "2 girls 1 cup" not in words
    docs = [["a", "b", "a"], ["a", "damn"], ["c"]]
    v = fd.WordVocab.build(docs, max_size=6, force={"damn", "never_seen"})
    assert v.itos[:4] == list(fd.SPECIALS) and v.itos[4] == "damn" and "never_seen" not in v.stoi
    assert len(v) == 6 and v.itos[5] == "a"                  # most frequent fills the rest
    ids = fd.encode([["a", "zzz"]], v, max_len=4)
    assert ids.tolist() == [[v.bos_id, v.stoi["a"], v.unk_id, v.eos_id, v.pad_id]]
    assert fd.wordlist_flags(docs, words).tolist() == [False, True, False]


def test_bigram_teachers_normalise_and_clean_one_is_safer():
    d = fd.prepare(FIXTURE, vocab_size=600, max_len=24, seed=0)
    V = len(d.vocab)
    clean = fd.BigramLM.fit(d.train.ids[~d.train.unsafe_doc], V)
    allm = fd.BigramLM.fit(d.train.ids, V)
    torch.testing.assert_close(allm.log_table.exp().sum(-1), torch.ones(V), atol=1e-4, rtol=0)
    x = d.val.ids[:, :-1]
    mass = lambda m: m(x).log_softmax(-1)[..., d.unsafe_ids].logsumexp(-1).exp().mean()  # noqa: E731
    assert mass(clean) < 0.5 * mass(allm)
    boosted = fd.BoostedLM(allm, d.unsafe_ids, V, boost=3.0)
    assert mass(boosted) > 5 * mass(allm)
    # the n-gram fitted on all training docs beats a unigram on held-out text
    uni = fd.BigramLM(allm.log_table.exp().mean(0).log().expand(V, V).clone())
    assert fd.perplexity(allm, d.test.ids) < fd.perplexity(uni, d.test.ids)


def test_lm_example_quick_constrained_vs_uniform():
    import fortunes_lm as L

    res = L.run(L.LMConfig.quick(str(FIXTURE)), ("uniform", "safekd_constrained"))
    uni, con = res["methods"]["uniform"], res["methods"]["safekd_constrained"]
    assert res["teachers"]["safety"]["jailbroken"] == min(res["teachers"]["safety"].values())
    # the constraints cut the student's unsafe mass and the flagged sampled continuations
    assert con["unsafe_rate"]["estimate"] < 0.5 * uni["unsafe_rate"]["estimate"]
    assert con["samples"]["wordlist"]["rate"] < uni["samples"]["wordlist"]["rate"]
    assert set(con["constraints"]) == {"cap(jailbroken)", "unsafe_mass", "safety_order", "unsafe_rate"}
    for name in ("cap(jailbroken)", "unsafe_mass", "safety_order"):
        assert con["constraints"][name]["passed"], name
    assert con["final_weights"]["jailbroken"] <= L.LMConfig.quick().cap_jailbroken + 1e-6
    assert con["perplexity"] < 2 * uni["perplexity"]
    s = con["samples"]
    assert s["n"] == 48 and 0.0 <= s["wordlist"]["rate"] <= s["wordlist"]["upper"] <= 1.0


def test_routing_example_quick_poisoned_teacher_is_contained():
    import fortunes_routing as R

    res = R.run(R.RoutingConfig.quick(str(FIXTURE)), ("best_single", "safekd_constrained"))
    assert res["teachers"]["best_single"] == "poisoned"      # it fits the (poisoned) training labels best
    best, con = res["methods"]["best_single"], res["methods"]["safekd_constrained"]
    assert best["unsafe"]["estimate"] > 0.3
    assert con["unsafe"]["estimate"] < best["unsafe"]["estimate"] / 2
    assert con["constraints"]["cap(poisoned)"]["passed"] and con["constraints"]["unsafe_mass"]["passed"]
    assert con["final_weights"]["poisoned"] <= R.RoutingConfig.quick().cap_poisoned + 1e-6
    assert con["accuracy"] > 1.0 / len(res["topics"])      # better than chance on true labels
