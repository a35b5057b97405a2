"""The CUDA path: the same results as on the CPU (projection, its gradient, a SafeDistiller step) and the demo's
main job with ``--device cuda``. Skipped where no CUDA device is present (CI)."""
import json

import numpy as np
import pytest
import torch

from safekd import constraints as C
from safekd.cli import main
from safekd.distiller import SafeDistiller
from safekd.spec import ChecksSpec, DualSpec, Spec, TeacherSpec
from safekd.weighting import ConfidenceSoftmax
from solvers import FeasibleSet, Status, project

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
F64 = torch.float64


def _safekd_like_set(rng: np.random.Generator, N: int, K: int) -> FeasibleSet:
    """Cap, floor, hard safety order and a soft per-token unsafe-mass row tight enough to empty some tokens' sets."""
    fs = FeasibleSet.simplex(K, dtype=F64).cap(K - 1, 0.3, name="cap").floor(0, 0.05, name="floor")
    fs = fs.order_by(torch.tensor(rng.permutation(K), dtype=F64), name="order", hard=True)
    a = torch.tensor(rng.uniform(0, 0.2, (N, K)))
    return fs.halfspace(a, torch.full((N,), 0.06, dtype=F64), name="unsafe_mass")


@pytest.mark.parametrize("K", [2, 4, 5, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_on_cuda_matches_cpu(K, dtype):
    rng = np.random.default_rng(K)
    N = 512
    fs = _safekd_like_set(rng, N, K).to(dtype=dtype)
    v = torch.tensor(rng.dirichlet(np.ones(K), N)).to(dtype)
    w_cpu, i_cpu = project(v, fs, return_info=True, on_all_empty="relax")
    w_gpu, i_gpu = project(v.cuda(), fs.to(device="cuda"), return_info=True, on_all_empty="relax")
    assert w_gpu.device.type == "cuda" and w_gpu.dtype == dtype
    tol = 1e-9 if dtype == F64 else 1e-5
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, atol=tol, rtol=0)
    assert torch.equal(i_gpu.status.cpu(), i_cpu.status)
    torch.testing.assert_close(i_gpu.relaxation.cpu(), i_cpu.relaxation, atol=tol, rtol=0)
    assert bool((i_gpu.status <= int(Status.RELAXED)).all())  # no cvxpy fallback (MAX_ITER) either


def test_projection_gradient_on_cuda():
    fs = FeasibleSet.simplex(4, dtype=F64, device="cuda").cap(3, 0.3).order_by(
        torch.tensor([4.0, 3, 2, 1], dtype=F64, device="cuda")).halfspace([0.9, 0.1, 0.3, 0.2], 0.45, name="u")
    v = torch.tensor([[0.1, 0.5, 0.2, -0.3], [0.2, 0.25, 0.8, 0.0], [0.0, 0.1, 0.3, 0.7]], dtype=F64, device="cuda",
                     requires_grad=True)
    torch.autograd.gradcheck(lambda x: project(x, fs), (v,))


def _distiller(device: str) -> tuple[SafeDistiller, dict]:
    K, V, B, T = 4, 200, 4, 32
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randint(0, V, (B, T), generator=g),
             "teacher_logits": 3 * torch.randn(B, T, K, V, generator=g)}
    batch = {k: t.to(device) for k, t in batch.items()}
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Embedding(V, 32), torch.nn.Tanh(), torch.nn.Linear(32, V)).to(device)
    spec = Spec(teachers=[TeacherSpec(f"t{k}", safety=float(K - k)) for k in range(K)],
                constraints=[C.cap("t3", 0.3), C.unsafe_mass(0.06), C.safety_order(), C.unsafe_rate(0.03)],
                unsafe=list(range(0, V, 20)), dual=DualSpec(rule="gradient_ascent", lr=0.05),
                checks=ChecksSpec(reference_every=2))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    return SafeDistiller(student, None, opt, spec, weighting=ConfidenceSoftmax(beta=2.0)), batch


def test_safedistiller_steps_on_cuda_match_cpu():
    """Three primal–dual steps (projection with relaxed tokens, target correction, cvxpy re-check) agree."""
    d_cpu, b_cpu = _distiller("cpu")
    d_gpu, b_gpu = _distiller("cuda")
    for _ in range(3):
        r_cpu, r_gpu = d_cpu.step(b_cpu), d_gpu.step(b_gpu)
        assert r_gpu.projection["relaxed_tokens"] == r_cpu.projection["relaxed_tokens"] > 0
        assert abs(r_gpu.loss - r_cpu.loss) <= 1e-4 * (1 + abs(r_cpu.loss))
        for name, c in r_cpu.constraints.items():
            assert abs(r_gpu.constraints[name]["multiplier"] - c["multiplier"]) <= 1e-5
    assert r_gpu.reference_check is None or r_gpu.reference_check["rows"] > 0
    for p_cpu, p_gpu in zip(d_cpu.student.parameters(), d_gpu.student.parameters()):
        torch.testing.assert_close(p_gpu.detach().cpu(), p_cpu.detach(), atol=1e-4, rtol=1e-4)


def test_demo_on_cuda_passes(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--device", "cuda", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and len(report["constraints"]) == 3 and all(c["passed"] for c in report["constraints"])
    assert report["metrics"]["accuracy"] > 0.9
