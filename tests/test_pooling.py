"""Pools: formulas, zero-probability handling, temperatures, top-k buckets, memory of the linear pool."""
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from safekd.pooling import (GeometricPool, LinearPool, PowerMeanPool, TemperedPool, geometric_pool, linear_pool,
                            log1mexp, power_mean_pool, soften, tempered_pool, topk_buckets)


def inputs(batch=(3, 4), K=3, V=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(2 * torch.randn(*batch, K, V, generator=g, dtype=dtype), -1)
    w = torch.softmax(torch.randn(*batch, K, generator=g, dtype=dtype), -1)
    return lp, w


def test_pool_formulas():
    lp, w = inputs()
    p = lp.exp()
    torch.testing.assert_close(linear_pool(lp, w).exp(), (w[..., None] * p).sum(-2))
    geo = (p ** w[..., None]).prod(-2)
    torch.testing.assert_close(geometric_pool(lp, w).exp(), geo / geo.sum(-1, keepdim=True))
    tem = geo ** (1 / 1.5)
    torch.testing.assert_close(tempered_pool(lp, w, lam=0.5).exp(), tem / tem.sum(-1, keepdim=True))
    pm = (w[..., None] * p.sqrt()).sum(-2) ** 2
    torch.testing.assert_close(power_mean_pool(lp, w, r=0.5).exp(), pm / pm.sum(-1, keepdim=True))
    torch.testing.assert_close(power_mean_pool(lp, w, r=1.0), linear_pool(lp, w))
    torch.testing.assert_close(power_mean_pool(lp, w, r=1e-7), geometric_pool(lp, w), atol=1e-5, rtol=0)


def test_zero_probabilities_give_no_nan():
    lp, w = inputs()
    lp = lp.clone()
    lp[..., 0, 2] = -math.inf  # teacher 0 gives token 2 zero probability
    lp = torch.log_softmax(lp, -1)
    w = w.clone()
    w[0, 0] = torch.tensor([0.0, 0.5, 0.5])  # ... but has weight 0 at one position
    for pool in (linear_pool, geometric_pool, lambda a, b: tempered_pool(a, b, 1.0),
                 lambda a, b: power_mean_pool(a, b, 0.5), lambda a, b: power_mean_pool(a, b, -1.0)):
        q = pool(lp, w)
        assert not bool(torch.isnan(q).any())
        torch.testing.assert_close(q.logsumexp(-1), torch.zeros(3, 4, dtype=q.dtype))
    geo = geometric_pool(lp, w)
    assert bool(torch.isneginf(geo[1:, :, 2]).all())  # veto by a weighted teacher
    assert bool(torch.isfinite(geo[0, 0, 2]))  # a zero-weight teacher does not veto
    assert bool(torch.isfinite(linear_pool(lp, w)[..., 2]).all())
    with pytest.raises(ValueError, match="disjoint supports"):
        geometric_pool(torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]]), torch.tensor([0.5, 0.5]))


def test_soften_and_per_teacher_temperatures():
    lp, w = inputs()
    T = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    soft = soften(lp, T)
    p = lp.exp() ** (1 / T[:, None])
    torch.testing.assert_close(soft.exp(), p / p.sum(-1, keepdim=True))
    torch.testing.assert_close(LinearPool(temperatures=T)(lp, w), linear_pool(soft, w))
    with pytest.raises(ValueError, match="temperatures"):
        soften(lp, torch.tensor([1.0, 0.0, 1.0]))


def test_topk_buckets_are_distributions_and_student_mapping():
    lp, w = inputs(V=50)
    b = topk_buckets(lp, k=4)
    M = b.ids.shape[-1]
    assert b.teacher_logp.shape == (3, 4, 3, M + 1) and M == 12
    torch.testing.assert_close(b.teacher_logp.logsumexp(-1), torch.zeros(3, 4, 3, dtype=torch.float64))
    z = torch.randn(3, 4, 50, dtype=torch.float64, requires_grad=True)
    sq = b.student(z)
    torch.testing.assert_close(sq.logsumexp(-1), torch.zeros(3, 4, dtype=torch.float64))
    # each teacher's own top-k mass is kept exactly
    top = lp.topk(4, -1).values.exp().sum(-1)
    kept = b.teacher_logp[..., :-1].exp().sum(-1)
    assert bool((kept >= top - 1e-12).all())
    pooled = linear_pool(b.teacher_logp, w)
    loss = (pooled.exp() * (pooled - sq)).sum()
    loss.backward()
    assert bool(torch.isfinite(z.grad).all())
    with pytest.raises(ValueError, match="k must"):
        topk_buckets(lp, 0)


def test_log1mexp_stable_and_nan_free_gradient():
    x = torch.tensor([-1e-20, -1e-3, -0.5, -5.0, -50.0, 0.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    ref = torch.log(-torch.expm1(torch.tensor([-1e-20, -1e-3, -0.5, -5.0, -50.0], dtype=torch.float64)))
    torch.testing.assert_close(y[:5], ref)
    y.sum().backward()
    assert bool(torch.isfinite(x.grad).all())


def test_module_wrappers_have_names_and_claims():
    lp, w = inputs()
    for pool, fn in ((LinearPool(), linear_pool), (GeometricPool(), geometric_pool),
                     (TemperedPool(0.3), lambda a, b: tempered_pool(a, b, 0.3)),
                     (PowerMeanPool(0.5), lambda a, b: power_mean_pool(a, b, 0.5))):
        torch.testing.assert_close(pool(lp, w), fn(lp, w))
        assert pool.name and "simplex_output" in pool.claims
    assert "idempotence" not in TemperedPool(0.3).claims and "idempotence" in TemperedPool(0.0).claims


def _allocated(fn, *args) -> list[int]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None and e.cpu_memory_usage > 0]


def test_pools_allocate_a_constant_number_of_teacher_sized_buffers():
    """The linear pool is one logsumexp over K (one [.., K, V] temporary); the geometric pool is a matmul
    over K (no [.., K, V] temporary). Measured with the torch profiler on a representative shape."""
    lp = torch.log_softmax(torch.randn(2, 32, 4, 2048), -1)
    w = torch.softmax(torch.randn(2, 32, 4), -1)
    nbytes = lp.numel() * lp.element_size()
    lin = _allocated(lambda a, b: linear_pool(a, b, validate_args=False), lp, w)
    geo = _allocated(lambda a, b: geometric_pool(a, b, validate_args=False), lp, w)
    # linear: the [.., K, V] sum log w + log p (1.0) plus [.., V] outputs; geometric: a bool -inf scan (0.25)
    # and [.., V] outputs (0.25 each) -- no float [.., K, V] temporary, which alone would be 1.0
    assert sum(lin) <= 1.6 * nbytes, sum(lin) / nbytes
    assert sum(geo) < 1.0 * nbytes and max(geo) <= 0.25 * nbytes, sum(geo) / nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_big_batch_on_cuda_stays_within_small_multiple():
    lp = torch.log_softmax(torch.randn(8, 512, 4, 32000, device="cuda"), -1)
    w = torch.softmax(torch.randn(8, 512, 4, device="cuda"), -1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_pool(lp, w)
    geometric_pool(lp, w)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 2.5 * lp.numel() * lp.element_size()


def test_linear_pool_without_autograd_equals_logsumexp():
    """Without autograd the pool runs in probability space; it equals torch.logsumexp to rounding, also with zero
    probabilities, zero weights, tokens every teacher gives probability 0, and entries so small that their
    probabilities underflow (recomputed in log space); with autograd it differentiates."""
    g = torch.Generator().manual_seed(3)
    for dtype, rtol in ((torch.float32, 1e-6), (torch.float64, 1e-14), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
        lp = torch.log_softmax(4 * torch.randn(3, 5, 4, 17, generator=g), -1).to(dtype)
        w = torch.softmax(torch.randn(3, 5, 4, generator=g), -1).to(dtype)
        lp[0, 0, 1, :5] = -math.inf
        lp[1, 2, :, 3] = -math.inf
        lp[2, 3, :, 4] = torch.tensor([-200.0, -180.0, -900.0, -math.inf]).to(dtype)  # underflows e^x in float32
        lp[2, 3, 0, 5] = -760.0  # underflows even in float64, while the other teachers carry the entry
        w[2, 1, 2] = 0
        ref = torch.logsumexp(torch.log(w).unsqueeze(-1) + lp, dim=-2)
        out = linear_pool(lp, w, validate_args=False)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=0)
        assert torch.isneginf(out[1, 2, 3]) and bool(torch.isfinite(out[2, 3, 4]))
    lp = torch.log_softmax(torch.randn(3, 4, 17, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    w = torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), -1)
    linear_pool(lp, w).exp().mul(torch.arange(17.0, dtype=torch.float64)).sum().backward()
    # d/d log p_kv of Σ_v c_v q_v = c_v w_k p_kv
    torch.testing.assert_close(lp.grad, torch.arange(17.0, dtype=torch.float64) * w.unsqueeze(-1) * lp.exp())
