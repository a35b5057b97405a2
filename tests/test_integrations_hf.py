"""SafeKDTrainer: tiny randomly initialised GPT-2 models built from a config (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safekd import constraints as C  # noqa: E402
from safekd.auditing import audit, write_report  # noqa: E402
from safekd.integrations.hf import LogitsOf, SafeKDTrainer, safekd_batch  # noqa: E402
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec  # noqa: E402
from safekd.steplog import StepLog, read_step_log  # noqa: E402

VOCAB, LENGTH, N = 24, 8, 16
CAP = 0.2


def tiny_gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                                   bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return transformers.GPT2LMHeadModel(cfg)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (N, LENGTH), generator=g)
    attn = torch.ones(N, LENGTH, dtype=torch.long)
    attn[::3, -2:] = 0  # some right padding
    return [{"input_ids": i, "attention_mask": a, "labels": i.masked_fill(a == 0, -100)} for i, a in zip(ids, attn)]


def spec() -> Spec:
    return Spec(teachers=[TeacherSpec("safe", 0.9), TeacherSpec("mid", 0.5), TeacherSpec("risky", 0.1)],
                constraints=[C.cap("risky", CAP), C.unsafe_rate(0.01)], unsafe=[0, 1],
                dual=DualSpec(rule="gradient_ascent", lr=5.0), checks=ChecksSpec(reference_every=0, alarm_window=0))


def test_lazy_export_resolves_to_the_trainer() -> None:
    import safekd.integrations

    assert safekd.integrations.SafeKDTrainer is SafeKDTrainer


def test_safekd_batch_shifts_causal_labels() -> None:
    ids = torch.tensor([[5, 6, 7]])
    b = safekd_batch({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0]]), "labels": ids, "task_ids": 3})
    assert torch.equal(b["inputs"], ids) and b["task_ids"] == 3
    assert torch.equal(b["labels"], torch.tensor([[6, 7, -100]]))
    assert b["mask"].tolist() == [[True, True, False]]
    assert torch.equal(safekd_batch({"input_ids": ids, "labels": ids}, causal=False)["labels"], ids)
    with pytest.raises(ValueError, match="input_ids"):
        safekd_batch({"labels": ids})


def test_trainer_trains_respects_cap_logs_and_audits(tmp_path: Path) -> None:
    student = tiny_gpt2(0)
    before = [p.detach().clone() for p in student.parameters()]
    teachers = {name: tiny_gpt2(seed) for name, seed in (("safe", 1), ("mid", 2), ("risky", 3))}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    log = StepLog(tmp_path / "steps.jsonl", summary_every=0)
    the_spec = spec()
    trainer = SafeKDTrainer(model=student, args=args, train_dataset=dataset(), teachers=teachers, spec=the_spec,
                            step_log=log)
    trainer.train()
    log.close()

    # 3 optimizer steps of 2 micro-batches: 6 safekd steps, all in the step log
    assert trainer.distiller.step_count == 6
    assert [r["step"] for r in read_step_log(tmp_path / "steps.jsonl")] == list(range(1, 7))
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), before))

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for h in logged:
        assert h["safekd/weight/risky"] <= CAP + 1e-6  # the cap holds after projection (float32) ...
        assert h["safekd/weight_composed/risky"] == pytest.approx(1 / 3)  # ... and was binding before it
        assert sum(h[f"safekd/weight/{t}"] for t in ("safe", "mid", "risky")) == pytest.approx(1.0)
        assert {"safekd/unsafe_rate/value", "safekd/unsafe_rate/multiplier", "safekd/kd_loss"} <= set(h)
    # random GPT-2s put ~2/24 of their mass on the unsafe ids, above the 1% threshold: the multiplier rises
    assert logged[-1]["safekd/unsafe_rate/value"] > 0.01
    assert logged[-1]["safekd/unsafe_rate/multiplier"] > logged[0]["safekd/unsafe_rate/multiplier"] > 0

    rows = dataset()
    data = safekd_batch({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    report = audit(LogitsOf(trainer.model), data, the_spec, teachers=trainer.teachers, distiller=trainer.distiller,
                   step_log=str(tmp_path / "steps.jsonl"), seed=0)
    paths = write_report(report, tmp_path / "audit")
    saved = json.loads(paths["json"].read_text())
    assert {c["name"] for c in saved["constraints"]} == {"cap(risky)", "unsafe_rate"}
    assert report.constraint("cap(risky)").passed
    assert report.constraint("cap(risky)").bound <= CAP + 1e-6


def test_weighting_to_moves_module_operators_and_passes_the_rest_through() -> None:
    from safekd.integrations.base import weighting_to

    op, fn = torch.nn.Linear(2, 2), (lambda s: s)
    moved = weighting_to({"token": op, "task": fn}, "meta")
    assert moved["token"].weight.device.type == "meta" and moved["task"] is fn
    assert weighting_to(torch.nn.Linear(2, 2), "meta").weight.device.type == "meta"
    assert weighting_to(None, "cpu") is None


def test_trainer_takes_a_mapped_teacher_a_callable_and_a_derived_teacher(tmp_path: Path) -> None:
    from safekd.teachers import derived
    from safekd.vocab import MappedTeacher, build_vocab_map

    student_vocab = [f"w{i}" for i in range(VOCAB)]
    teacher_vocab = [f"w{i}" for i in range(0, VOCAB, 2)] + [f"x{i}" for i in range(VOCAB)]  # another tokenizer
    torch.manual_seed(4)
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(teacher_vocab), n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2))
    mapped = MappedTeacher(other, build_vocab_map(teacher_vocab, student_vocab, student_unk="w1"))
    base = tiny_gpt2(1)
    calls = []
    base.register_forward_hook(lambda *a: calls.append(1))
    shift = torch.zeros(VOCAB)
    shift[:2] = 2.0
    plain = tiny_gpt2(2)
    teachers = {"safe": mapped, "mid": lambda ids: plain(ids).logits, "risky": derived(base, lambda z: z + shift)}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        seed=0)
    with pytest.warns(UserWarning, match="UNK"):
        trainer = SafeKDTrainer(model=tiny_gpt2(0), args=args, train_dataset=dataset(), teachers=teachers,
                                spec=spec())
        trainer.train()
    assert trainer.distiller.step_count == 2
    assert len(calls) == 2  # the derived teacher ran its base once per step
    assert not any(p.requires_grad for p in base.parameters())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["safekd/weight/risky"] <= CAP + 1e-6 for h in logged)
    with pytest.raises(TypeError, match="teacher 'mid'"):
        SafeKDTrainer(model=tiny_gpt2(0), args=args, train_dataset=dataset(), spec=spec(),
                      teachers={**teachers, "mid": 3})
