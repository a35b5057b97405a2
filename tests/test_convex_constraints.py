"""Convex teacher-weight constraints in the distiller: min_entropy, kl_ball, stability, convex(fn), spec files."""
import math

import cvxpy as cp
import pytest
import torch

import solvers
from safekd import constraints as C
from safekd.distiller import SafeDistiller
from safekd.spec import ChecksSpec, DualSpec, Spec, SpecError, TeacherSpec
from safekd.weighting import ConfidenceSoftmax

NAMES = ("safe", "mid", "risky")


def _setup(constraints, V=12, B=2, T=6, seed=0, checks=None):
    g = torch.Generator().manual_seed(seed)
    spec = Spec(teachers=[TeacherSpec(n) for n in NAMES], constraints=constraints, dual=DualSpec(lr=0.1),
                checks=checks or ChecksSpec(reference_every=1, alarm_window=0))
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Tanh(), torch.nn.Linear(8, V))
    batch = {"inputs": torch.randint(0, V, (B, T), generator=g),
             "teacher_logits": 4 * torch.randn(B, T, 3, V, generator=g)}
    d = SafeDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1), spec,
                      weighting=ConfidenceSoftmax(beta=8.0))
    return d, batch


def _per_row(v, fs, cons_of_row):
    N = v.shape[0]
    e = fs.to(dtype=torch.float64).expand((N,))
    return torch.cat([solvers.reference.project(v[i:i + 1].double(), e[torch.tensor([i])],
                                                extra_constraints=cons_of_row(i)) for i in range(N)])


def test_min_entropy_holds_on_every_token_and_matches_cvxpy():
    h = 0.8
    d, batch = _setup([C.cap("risky", 0.7), C.min_entropy(h)])
    rec = d.step(batch)  # the reference check (every step) runs on the tokens where the floor does not bind
    t = d.targets(batch)
    w = t.weights.reshape(-1, 3).double()
    ent = -(w * w.clamp_min(1e-300).log()).sum(-1)
    assert bool((ent >= h - 1e-7).all())
    v = t.composed.reshape(-1, 3)
    assert float((-(v * v.log()).sum(-1)).min()) < h - 0.1  # the unconstrained weights collapse below the floor
    wr = _per_row(v, t.feasible_set, lambda i: (lambda x: [cp.sum(cp.entr(x)) >= h]))
    assert torch.allclose(w, wr, atol=1e-6, rtol=0), (w - wr).abs().max()
    m = rec.projection["convex"]["min_entropy"]
    assert m["satisfied"] and m["value"] >= h - 1e-7 and m["active_tokens"] > 0 and rec.projection["conic_tokens"] > 0
    assert t.convex_residuals["min_entropy"].shape == t.mask.shape


def test_kl_ball_holds_on_every_token_and_matches_cvxpy():
    ref = {"safe": 0.5, "mid": 0.3, "risky": 0.2}
    d, batch = _setup([C.kl_ball(ref, 0.1)])
    rec = d.step(batch)
    t = d.targets(batch)
    w = t.weights.reshape(-1, 3).double()
    r = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert bool(((w * (w.log() - r.log())).sum(-1) <= 0.1 + 1e-7).all())
    wr = _per_row(t.composed.reshape(-1, 3), solvers.FeasibleSet.simplex(3),
                  lambda i: (lambda x: [cp.sum(cp.kl_div(x, r.numpy())) <= 0.1]))
    assert torch.allclose(w, wr, atol=1e-6, rtol=0), (w - wr).abs().max()
    assert rec.projection["convex"]["kl_ball"]["value"] <= 0.1 + 1e-7


def _jumping_batches(n, V=12, B=2, T=6):
    """Task 0 and 1 batches whose confident teacher flips every step: unconstrained task weights jump."""
    g = torch.Generator().manual_seed(3)
    out = []
    for s in range(n):
        logits = torch.randn(B, T, 3, V, generator=g)
        logits[:, :, s % 3, 0] += 12.0  # teacher s mod 3 is very confident
        out.append({"inputs": torch.randint(0, V, (B, T), generator=g), "teacher_logits": logits,
                    "task_ids": torch.tensor([0, 1])})
    return out


def test_stability_bounds_the_step_to_step_change_where_unconstrained_weights_jump(tmp_path):
    delta = 0.1
    batches = _jumping_batches(6)
    free, _ = _setup([C.cap("risky", 1.0)], checks=ChecksSpec(reference_every=0, alarm_window=0))
    d, _ = _setup([C.stability(delta, scale="task")], checks=ChecksSpec(reference_every=0, alarm_window=0))
    jumps, changes = [], []
    prev = None
    for b in batches:
        t = free.targets(b)
        means = torch.stack([t.weights[i].reshape(-1, 3).mean(0) for i in range(2)])
        if prev is not None:
            jumps.append(float((means - prev).abs().sum(-1).max()))
        prev = means
        rec = d.step(b)
        changes.append(rec.projection["convex"]["stability(task)"]["step_change"])
    assert max(jumps) > 5 * delta  # the unconstrained task weights jump
    assert max(changes) <= delta + 1e-6 and max(changes) > 0.5 * delta
    # every token equals its own cvxpy projection onto the ℓ1 ball around its task's previous mean
    prev = {k: m.clone() for k, m in d.convex_state["stability(task)"].items()}
    t = d.targets(batches[0])  # no step: the state is unchanged
    keys = torch.tensor([0, 1]).repeat_interleave(6)  # task ids per sequence, 6 tokens each
    wr = _per_row(t.composed.reshape(-1, 3), solvers.FeasibleSet.simplex(3),
                  lambda i: (lambda x: [cp.norm1(x - prev[int(keys[i])].numpy()) <= delta]))
    w = t.weights.reshape(-1, 3).double()
    assert torch.allclose(w, wr, atol=1e-6, rtol=0), (w - wr).abs().max()
    assert bool(((w - torch.stack([prev[int(k)] for k in keys])).abs().sum(-1) <= delta + 1e-7).all())
    # the previous means are part of the state and the checkpoint
    path = tmp_path / "ck.pt"
    d.save_checkpoint(str(path))
    d2, _ = _setup([C.stability(delta, scale="task")], checks=ChecksSpec(reference_every=0, alarm_window=0))
    d2.load_checkpoint(str(path))
    assert sorted(d2.convex_state["stability(task)"]) == [0, 1]
    for k, m in d.convex_state["stability(task)"].items():
        assert torch.equal(d2.convex_state["stability(task)"][k], m)
    rec = d2.step(batches[0])
    assert rec.projection["convex"]["stability(task)"]["step_change"] <= delta + 1e-6


def test_empty_convex_set_is_relaxed_not_fatal():
    # a cap on two teachers keeps the entropy below log 3: the floor cannot hold and is relaxed least
    d, batch = _setup([C.cap("risky", 0.05), C.cap("mid", 0.05), C.min_entropy(math.log(3) - 0.01)],
                      checks=ChecksSpec(reference_every=0, alarm_window=0))
    rec = d.step(batch)
    m = rec.projection["convex"][f"min_entropy"]
    assert not m["satisfied"] and m["value"] < math.log(3) - 0.01
    w = d.targets(batch).weights
    assert bool((w[..., 1:] <= 0.05 + 1e-6).all())  # the polyhedral caps are kept (float32 weights)


def test_generic_convex_constraint():
    def pairwise(w, p):  # w_safe ≥ 2 w_risky, row-wise
        return [2 * w[:, 2] - w[:, 0] <= 0]

    def pairwise_t(w, p):
        return (2 * w[:, 2] - w[:, 0])[:, None]

    d, batch = _setup([C.convex(pairwise, name="ratio", values=pairwise_t)])
    rec = d.step(batch)
    w = d.targets(batch).weights
    assert bool((2 * w[..., 2] - w[..., 0] <= 1e-7).all())
    assert rec.projection["convex"]["ratio"]["satisfied"]
    # spec files and checkpoints name the callables, as for metric(fn)
    assert d.spec.to_dict()["constraints"] == [{"kind": "convex", "name": "ratio", "fn": "pairwise",
                                                "values": "pairwise_t"}]
    back = Spec.from_dict(d.spec.to_dict(), functions={"pairwise": pairwise, "pairwise_t": pairwise_t})
    assert back.constraints[0].fn is pairwise and back.constraints[0].values is pairwise_t
    assert d.state_dict()["spec"] == d.spec.to_dict()
    kinked = {"kind": "convex", "name": "l1", "fn": "pairwise", "params": {"c": [0.2, 0.3, 0.5]}, "smooth": False}
    spec = Spec.from_dict({"teachers": list(NAMES), "constraints": [kinked]}, functions={"pairwise": pairwise})
    assert spec.to_dict()["constraints"] == [kinked] and not spec.constraints[0].smooth
    with pytest.raises(SpecError, match=r"constraints\[0\]\.smooth"):
        Spec.from_dict({"teachers": list(NAMES), "constraints": [{**kinked, "smooth": "no"}]},
                       functions={"pairwise": pairwise})


def test_named_convex_constraints_load_from_spec_files(tmp_path):
    yaml_text = """
teachers: [safe, mid, risky]
constraints:
  - {kind: min_entropy, min: 0.5}
  - {kind: kl_ball, reference: {safe: 0.5, mid: 0.3, risky: 0.2}, max: 0.2}
  - {kind: stability, max: 0.1, scale: step}
"""
    from safekd.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text(yaml_text)
    spec = load_spec(p)
    kinds = [type(c) for c in spec.constraints]
    assert kinds == [C.MinEntropy, C.KLBall, C.Stability] and spec.constraints[2].scale == "step"
    assert Spec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    toml = tmp_path / "s.toml"
    toml.write_text('teachers = ["safe", "mid", "risky"]\n[[constraints]]\nkind = "min_entropy"\nmin = 0.5\n')
    assert isinstance(load_spec(toml).constraints[0], C.MinEntropy)
    p.write_text(yaml_text.replace("scale: step", "scale: global"))
    with pytest.raises(SpecError, match=r"constraints\[2\].*scale"):
        load_spec(p)
    p.write_text(yaml_text.replace("risky: 0.2}", "risky: 0.4}"))
    with pytest.raises(SpecError, match="sum to 1"):
        load_spec(p)


def test_audit_reports_the_convex_constraints():
    from safekd.auditing import audit

    d, batch = _setup([C.min_entropy(0.8), C.kl_ball({"safe": 0.5, "mid": 0.3, "risky": 0.2}, 0.05)],
                      checks=ChecksSpec(reference_every=0, alarm_window=0))
    d.step(batch)
    report = audit(d.student, batch, d.spec, distiller=d)
    rows = {r.name: r for r in report.constraints}
    assert rows["min_entropy"].passed and rows["min_entropy"].estimate >= 0.8 - 1e-6
    assert rows["kl_ball"].passed and rows["kl_ball"].estimate <= 0.05 + 1e-6
    assert rows["min_entropy"].n == batch["inputs"].numel()
    loose, batch = _setup([C.min_entropy(0.01)], checks=ChecksSpec(reference_every=0, alarm_window=0))
    row = audit(loose.student, batch, loose.spec, distiller=loose).constraints[0]
    w = loose.targets(batch).weights.double()
    worst = float((-(w * w.clamp_min(1e-300).log()).sum(-1)).min())
    assert worst > 0.05 and row.estimate == pytest.approx(worst, abs=1e-5)  # the measured worst token, not 0.01


def test_stability_keys_by_task_context_or_step():
    shape = torch.Size([2, 3])
    batch = {"task_ids": torch.tensor([4, 7]), "context": torch.tensor([[1.0], [2.0]])}
    assert C.stability(0.1, "task").keys(batch, shape, torch.device("cpu")).tolist() == [[4] * 3, [7] * 3]
    assert C.stability(0.1, "context").keys(batch, shape, torch.device("cpu")).tolist() == [[1] * 3, [2] * 3]
    assert C.stability(0.1, "step").keys({}, shape, torch.device("cpu")).tolist() == [[0] * 3] * 2
    with pytest.raises(ValueError, match=r"needs batch\['task_ids'\]"):
        C.stability(0.1, "task").keys({}, shape, torch.device("cpu"))
    with pytest.raises(ValueError, match="integer domain ids"):
        C.stability(0.1, "context").keys({"context": torch.rand(2, 4)}, shape, torch.device("cpu"))


def _stability_rank(rank, world_size, out_dir, batch):
    d, _ = _setup([C.stability(0.1, scale="task")], checks=ChecksSpec(reference_every=0, alarm_window=0))
    d.step({k: v[rank:rank + 1] for k, v in batch.items()})  # rank r holds task r only
    torch.save(d.convex_state, out_dir / f"state{rank}.pt")


def test_stability_means_are_global_under_ddp(tmp_path):
    from test_distributed import launch

    _, batch = _setup([C.stability(0.1, scale="task")])
    batch["task_ids"] = torch.tensor([0, 1])
    launch(2, _stability_rank, tmp_path, batch)
    states = [torch.load(tmp_path / f"state{r}.pt") for r in range(2)]
    single, _ = _setup([C.stability(0.1, scale="task")], checks=ChecksSpec(reference_every=0, alarm_window=0))
    single.step(batch)
    for s in states:  # every rank keeps both tasks' means, equal to the single-process run on the whole batch
        assert sorted(s["stability(task)"]) == [0, 1]
        for k, m in single.convex_state["stability(task)"].items():
            assert torch.allclose(s["stability(task)"][k], m, atol=1e-6)


def test_convex_constraint_with_an_equality_measures_both_sides():
    """``values`` gives an equality's signed residual lhs − rhs; the measurement reads |lhs − rhs|."""
    c = C.convex(lambda w, p: [w[:, 0] - 2 * w[:, 1] == 0], name="ratio",
                 values=lambda w, p: (w[:, 0] - 2 * w[:, 1])[:, None])
    w = torch.tensor([[0.2, 0.3, 0.5], [0.4, 0.2, 0.4], [0.5, 0.1, 0.4]], dtype=torch.float64)
    assert torch.allclose(c.value(w, {}), torch.tensor([0.4, 0.0, 0.3], dtype=torch.float64))
