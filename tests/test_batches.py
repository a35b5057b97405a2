"""The batch protocol: in-memory and iterable sources, shuffling, devices, row checks, -100 labels as the mask."""
import pytest
import torch

from safekd import constraints as C
from safekd.batches import IGNORE_INDEX, default_mask, iter_batches, num_examples
from safekd.distiller import SafeDistiller
from safekd.spec import ChecksSpec, Spec, TeacherSpec


def _data(n=10):
    return {"inputs": {"input_ids": torch.arange(n).view(n, 1)}, "labels": torch.arange(n), "note": "kept"}


def test_in_memory_source_is_cut_in_order_or_shuffled_reproducibly():
    d = _data()
    assert [b["labels"].tolist() for b in iter_batches(d, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    one = [b["labels"].tolist() for b in iter_batches(d, 4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    two = [b["inputs"]["input_ids"].ravel().tolist()
           for b in iter_batches(d, 4, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert one == two and sorted(sum(one, [])) == list(range(10)) and one != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b["note"] == "kept" for b in iter_batches(d, 4))


def test_iterable_source_passes_batches_through_and_names_a_bad_one():
    batches = [_data(3), _data(2)]
    assert [b["labels"].tolist() for b in iter_batches(batches, device="cpu")] == [[0, 1, 2], [0, 1]]
    with pytest.raises(ValueError, match="batch 1 of the data iterable must be a dict with 'inputs'"):
        list(iter_batches([_data(2), {"labels": torch.zeros(2)}]))
    with pytest.raises(TypeError, match="dict of tensors or an iterable of batches"):
        list(iter_batches(3))


def test_row_counts_are_checked_against_inputs():
    with pytest.raises(ValueError, match=r"data\['labels'\] has 2 rows but data\['inputs'\] has 3"):
        num_examples({"inputs": torch.zeros(3, 1), "labels": torch.zeros(2)})
    with pytest.raises(ValueError, match="empty"):
        num_examples({"inputs": torch.zeros(0, 1)})
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(iter_batches(_data(), 0))


def test_default_mask_is_labels_not_ignored():
    labels = torch.tensor([[3, IGNORE_INDEX, 1], [IGNORE_INDEX, 0, 2]])
    assert default_mask({"labels": labels}, labels.shape, labels.device).tolist() == [[True, False, True],
                                                                                      [False, True, True]]
    assert default_mask({}, (2, 3), torch.device("cpu")).all()


def test_kd_loss_without_mask_skips_ignored_labels():
    """No ``mask`` in the batch: positions labelled -100 do not count, exactly as an explicit mask would."""
    V, K = 7, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (3, 5), generator=g)
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 1] = IGNORE_INDEX
    teacher_logits = torch.randn(3, 5, K, V, generator=g)
    spec = Spec(teachers=[TeacherSpec("a"), TeacherSpec("b")], constraints=[C.cap("b", 0.4)],
                checks=ChecksSpec(reference_every=0, alarm_window=0))

    def loss(batch):
        torch.manual_seed(0)
        student = torch.nn.Sequential(torch.nn.Embedding(V, 4), torch.nn.Linear(4, V))
        d = SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1), spec)
        _, pending = d.loss(batch)
        return pending.kd_loss

    implicit = loss({"inputs": x, "labels": labels, "teacher_logits": teacher_logits})
    explicit = loss({"inputs": x, "labels": labels, "teacher_logits": teacher_logits, "mask": labels != IGNORE_INDEX})
    everything = loss({"inputs": x, "labels": labels, "teacher_logits": teacher_logits,
                       "mask": torch.ones_like(labels, dtype=torch.bool)})
    assert torch.equal(implicit, explicit) and not torch.allclose(implicit, everything)
