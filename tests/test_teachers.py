"""Derived teachers share their base's forward; every label reader ignores -100 labels."""
import pytest
import torch

from safekd import constraints as C
from safekd.distiller import SafeDistiller
from safekd.signals import Signals
from safekd.spec import ChecksSpec, Spec, TeacherSpec
from safekd.teachers import derived, teacher_outputs
from safekd.weighting import CAMKD, GoldLikelihood, MTBert

V = 10


class Counting(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, V)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.emb(x)


def _spec(K: int, constraints=()) -> Spec:
    return Spec(teachers=[TeacherSpec(f"t{i}") for i in range(K)], constraints=list(constraints), unsafe=[0],
                checks=ChecksSpec(reference_every=0, alarm_window=0))


def test_derived_teachers_share_one_base_forward_per_batch() -> None:
    base, other = Counting(0), Counting(1)
    shift = torch.zeros(V)
    shift[0] = 3.0
    jail = derived(base, lambda z: z + shift)
    twice = derived(jail, lambda z: 2 * z)  # derived from a derived teacher
    x = torch.randint(0, V, (2, 5))
    outs = teacher_outputs([base, jail, twice, other], x)
    assert base.calls == 1 and other.calls == 1
    torch.testing.assert_close(outs[1], base.emb(x) + shift)
    torch.testing.assert_close(outs[2], 2 * (base.emb(x) + shift))
    torch.testing.assert_close(jail(x), outs[1])  # standalone, a derived teacher is an ordinary teacher

    student = Counting(2)
    d = SafeDistiller(student, {"t0": base, "t1": jail, "t2": other}, torch.optim.SGD(student.parameters(), lr=0.1),
                      _spec(3, [C.cap("t1", 0.2)]))
    base.calls = other.calls = 0
    d.step({"inputs": x})
    assert base.calls == 1 and other.calls == 1


def test_teacher_outputs_unwrap_logits_and_name_a_bad_teacher() -> None:
    class Out:
        def __init__(self, logits):
            self.logits = logits

    x = torch.randint(0, V, (2, 3))
    z = torch.randn(2, 3, V)
    assert teacher_outputs([lambda i: Out(z)], x)[0] is z
    with pytest.raises(TypeError, match="teacher 'bad'"):
        teacher_outputs([lambda i: "nope"], x, ["bad"])
    with pytest.raises(TypeError, match="two callables"):
        derived(3, lambda z: z)


@pytest.mark.parametrize("op", [GoldLikelihood(beta=1.0, epsilon=0.1), CAMKD(epsilon=0.1), MTBert(epsilon=0.1)])
def test_label_readers_ignore_minus_100(op) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, V, generator=g)
    labels = torch.randint(0, V, (2, 4), generator=g)
    labels[0, 1:] = -100
    lp = torch.log_softmax(logits, -1)
    gold = Signals(teacher_logits=logits, labels=labels).gold_logprobs()
    keep = labels >= 0
    torch.testing.assert_close(gold[keep], lp[keep].gather(-1, labels[keep][:, None, None].expand(-1, 3, 1))[..., 0])
    assert bool((gold[~keep] == 0).all())
    w = op(Signals(teacher_logits=logits, labels=labels, mask=keep))
    torch.testing.assert_close(w[keep], op(Signals(teacher_logits=logits[keep], labels=labels[keep])))
    # through a training step, with no mask: -100 is never used as an index, and accuracy does not count it
    student = Counting(3)
    d = SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1),
                      _spec(3, [C.retain("accuracy", 0.0), C.unsafe_rate(0.5)]), weighting=op)
    rec = d.step({"inputs": torch.randint(0, V, (2, 4), generator=g), "teacher_logits": logits, "labels": labels})
    assert rec.constraints["retain(accuracy)"]["count"] == float(keep.sum())
