"""Vocabulary mapping: teacher logits over V_t → student log-probs over V_s with a tail bucket."""
import math

import pytest
import torch

from safekd.vocab import MappedTeacher, build_vocab_map, strip_subword_markers

STUDENT = ["<pad>", "<unk>", "the", "cat", "sat", "on", "mat", "dog", "zebra"]
# Teacher: different size and order, lacks "zebra", has tokens the student lacks ("a", "hat", "ran").
TEACHER = ["mat", "a", "dog", "the", "<unk>", "hat", "on", "cat", "ran", "sat", "<pad>"]


def _manual(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    out = torch.zeros(*logits.shape[:-1], len(STUDENT), dtype=logits.dtype)
    t_idx = {t: j for j, t in enumerate(TEACHER)}
    for s, tok in enumerate(STUDENT):
        if tok in t_idx:
            out[..., s] += p[..., t_idx[tok]]
    for tok in ("a", "hat", "ran"):  # unmatched teacher mass -> student <unk>
        out[..., 1] += p[..., t_idx[tok]]
    return out


def test_logprobs_match_manual_scatter_and_sum_to_one():
    vm = build_vocab_map(TEACHER, STUDENT, student_unk="<unk>")
    assert vm.teacher_size == len(TEACHER) and vm.student_size == len(STUDENT)
    logits = torch.randn(3, 5, len(TEACHER), dtype=torch.float64) * 4
    lp = vm.logprobs(logits)
    assert lp.shape == (3, 5, len(STUDENT))
    torch.testing.assert_close(lp.exp(), _manual(logits))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert torch.isneginf(lp[..., STUDENT.index("zebra")]).all()      # no teacher token reaches it
    assert not vm.covered[STUDENT.index("zebra")] and vm.covered[STUDENT.index("cat")]
    assert vm.coverage == pytest.approx(8 / 9)


def test_smoothing_mixes_uniform_and_keeps_normalisation():
    vm = build_vocab_map(TEACHER, STUDENT, student_unk="<unk>")
    logits = torch.randn(4, len(TEACHER), dtype=torch.float64)
    eps = 1e-3
    lp = vm.logprobs(logits, smoothing=eps)
    expect = (1 - eps) * _manual(logits) + eps / len(STUDENT)
    torch.testing.assert_close(lp.exp(), expect)
    assert torch.isfinite(lp).all()


def test_stable_for_extreme_logits_and_differentiable():
    vm = build_vocab_map(TEACHER, STUDENT, student_unk="<unk>")
    logits = torch.randn(2, len(TEACHER), dtype=torch.float64) * 1e3
    lp = vm.logprobs(logits, smoothing=1e-6)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    x = torch.randn(2, len(TEACHER), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: vm.logprobs(z, smoothing=1e-2), (x,))


def test_many_to_one_normaliser_adds_probabilities():
    teacher = ["<unk>", "Ġcat", "cat", "▁dog", "Ġthe", "x"]
    vm = build_vocab_map(teacher, STUDENT, student_unk="<unk>", normalize=strip_subword_markers)
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0, 3.0]], dtype=torch.float64)
    p = logits.softmax(-1)[0]
    q = vm.logprobs(logits).exp()[0]
    assert q[STUDENT.index("cat")] == pytest.approx(float(p[1] + p[2]))
    assert q[STUDENT.index("dog")] == pytest.approx(float(p[3]))
    assert q[1] == pytest.approx(float(p[0] + p[5]))
    # inputs: the exact string wins over a normalised match
    assert vm.encode(torch.tensor([STUDENT.index("cat")])).item() == 2
    assert vm.encode(torch.tensor([STUDENT.index("dog")])).item() == 3


def test_encode_maps_inputs_and_sends_absent_tokens_to_teacher_unk():
    vm = build_vocab_map(TEACHER, STUDENT, student_unk="<unk>")
    s = torch.tensor([[2, 3, 8, 1]])
    assert vm.encode(s).tolist() == [[TEACHER.index("the"), TEACHER.index("cat"), TEACHER.index("<unk>"),
                                      TEACHER.index("<unk>")]]
    with pytest.raises(ValueError, match="student_ids"):
        vm.encode(torch.tensor([len(STUDENT)]))


def test_dict_vocab_with_padded_model_rows_goes_to_tail():
    tv = {t: i for i, t in enumerate(TEACHER)}
    vm = build_vocab_map(tv, STUDENT, student_unk="<unk>", teacher_size=len(TEACHER) + 5)
    logits = torch.randn(len(TEACHER) + 5, dtype=torch.float64)
    p = logits.softmax(-1)
    q = vm.logprobs(logits).exp()
    tail = p[[TEACHER.index(t) for t in ("a", "hat", "ran", "<unk>")]].sum() + p[len(TEACHER):].sum()
    assert float(q[1]) == pytest.approx(float(tail))


def test_errors_name_the_bad_argument():
    vm = build_vocab_map(TEACHER, STUDENT, student_unk="<unk>")
    with pytest.raises(ValueError, match="student_unk"):
        build_vocab_map(TEACHER, STUDENT, student_unk="<oov>")
    with pytest.raises(ValueError, match="teacher_unk"):
        build_vocab_map(TEACHER, STUDENT, student_unk="<unk>", teacher_unk="<oov>")
    with pytest.raises(ValueError, match="student_vocab has repeated"):
        build_vocab_map(TEACHER, STUDENT + ["cat"], student_unk="<unk>")
    with pytest.raises(ValueError, match="teacher_logits last dim"):
        vm.logprobs(torch.randn(2, len(TEACHER) + 1))
    with pytest.raises(ValueError, match="NaN or inf"):
        vm.logprobs(torch.full((len(TEACHER),), math.nan))
    with pytest.raises(ValueError, match="smoothing"):
        vm.logprobs(torch.randn(len(TEACHER)), smoothing=1.0)
    with pytest.raises(TypeError, match="teacher_vocab"):
        build_vocab_map("abc", STUDENT, student_unk="<unk>")


def test_hf_causal_lm_with_other_vocab_size_as_teacher():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    # A word-level HF tokenizer built in memory (no download) with its own ids and size.
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(TEACHER)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    padded = 16                                  # the model's output layer is wider than the vocabulary
    cfg = transformers.GPT2Config(vocab_size=padded, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    vm = build_vocab_map(hf_tok.get_vocab(), STUDENT, student_unk="<unk>", teacher_size=padded)
    teacher = MappedTeacher(model, vm, smoothing=0.0)

    student_ids = torch.tensor([[2, 3, 4, 5, 2, 6], [2, 7, 8, 1, 0, 0]])
    with torch.no_grad():
        lp = teacher(student_ids)
        raw = model(vm.encode(student_ids)).logits
    assert lp.shape == (2, 6, len(STUDENT))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 6))
    # the mapped teacher reads the same token stream the HF tokenizer would produce for the words
    assert vm.encode(student_ids[:1]).tolist()[0] == hf_tok("the cat sat on the mat")["input_ids"]
    p = raw.softmax(-1)
    cat_t = hf_tok.get_vocab()["cat"]
    torch.testing.assert_close(lp[..., STUDENT.index("cat")].exp(), p[..., cat_t])
    unmatched = [i for i in range(padded) if i >= len(TEACHER) or TEACHER[i] in ("a", "hat", "ran", "<unk>")]
    torch.testing.assert_close(lp[..., 1].exp(), p[..., unmatched].sum(-1))
    # gradients reach the HF model's parameters through the mapping
    teacher(student_ids)[..., STUDENT.index("cat")].sum().backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_mapped_hf_teacher_plugs_into_safe_distiller_next_to_a_plain_module():
    transformers = pytest.importorskip("transformers")
    from torch import nn

    from safekd.constraints import cap
    from safekd.distiller import SafeDistiller
    from safekd.spec import ChecksSpec, Spec, TeacherSpec

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(TEACHER), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    vm = build_vocab_map(TEACHER, STUDENT, student_unk="<unk>")
    V = len(STUDENT)
    plain = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V))          # any nn.Module returning logits
    student = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V))
    spec = Spec(teachers=(TeacherSpec("hf"), TeacherSpec("plain")), constraints=(cap("hf", 0.3),),
                checks=ChecksSpec(reference_every=0))
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    dist = SafeDistiller(student, {"hf": MappedTeacher(hf, vm), "plain": plain}, opt, spec)
    ids = torch.randint(2, V, (4, 6))
    before = student[1].weight.detach().clone()
    rec = dist.step({"inputs": ids})
    assert rec.weights["projected"]["hf"] <= 0.3 + 1e-6
    assert not torch.equal(before, student[1].weight)
