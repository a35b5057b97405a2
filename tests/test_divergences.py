"""Divergences: exact identities with pools, masks, temperature, token-count normalisation."""
import math

import pytest
import torch

from safekd.divergences import (DIVERGENCES, Divergence, DivergenceOutput, forward_kl, generalized_jsd,
                                kl_per_token, reverse_kl, skew_kl, tvd)
from safekd.pooling import geometric_pool, linear_pool


def data(B=4, T=5, K=3, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(2 * torch.randn(B, T, K, V, generator=g, dtype=torch.float64), -1)
    w = torch.softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    return lp, w, z


def grad(f, z):
    z = z.clone().requires_grad_(True)
    f(z).backward()
    return z.grad


def test_forward_kl_linear_pool_gradient_equals_weighted_per_teacher_gradient():
    lp, w, z = data()
    pooled = linear_pool(lp, w)
    g_pool = grad(lambda x: forward_kl(pooled, x).sum, z)
    g_each = grad(lambda x: (w * kl_per_token(lp, torch.log_softmax(x, -1).unsqueeze(-2))).sum(), z)
    torch.testing.assert_close(g_pool, g_each)
    # and the values differ by the (student-free) generalised JS disagreement Σ_k w_k KL(p_k‖p̄)
    lq = torch.log_softmax(z, -1)
    lhs = (w * kl_per_token(lp, lq.unsqueeze(-2))).sum(-1)
    rhs = kl_per_token(pooled, lq) + (w * kl_per_token(lp, pooled.unsqueeze(-2))).sum(-1)
    torch.testing.assert_close(lhs, rhs)


def test_reverse_kl_averaging_equals_distilling_to_geometric_pool_up_to_constant():
    lp, w, z = data()
    geo = geometric_pool(lp, w)
    log_z = torch.logsumexp((w.unsqueeze(-1) * lp).sum(-2), -1)  # log Z ≤ 0
    lq = torch.log_softmax(z, -1)
    weighted = (w * kl_per_token(lq.unsqueeze(-2), lp)).sum(-1)
    torch.testing.assert_close(weighted, reverse_kl(geo, z).per_token - log_z)
    assert bool((log_z <= 1e-12).all())
    g_geo = grad(lambda x: reverse_kl(geo, x).sum, z)
    g_each = grad(lambda x: (w * kl_per_token(torch.log_softmax(x, -1).unsqueeze(-2), lp)).sum(), z)
    torch.testing.assert_close(g_geo, g_each)


def test_divergence_formulas_and_endpoints():
    lp, w, z = data()
    t = linear_pool(lp, w)
    p, q = t.exp(), torch.softmax(z, -1)
    torch.testing.assert_close(forward_kl(t, z).per_token, (p * (p / q).log()).sum(-1))
    torch.testing.assert_close(reverse_kl(t, z).per_token, (q * (q / p).log()).sum(-1))
    m = 0.5 * (p + q)
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(generalized_jsd(t, z, beta=0.5).per_token, js)
    torch.testing.assert_close(generalized_jsd(t, z, beta=0.0).per_token, forward_kl(t, z).per_token)
    torch.testing.assert_close(generalized_jsd(t, z, beta=1.0).per_token, reverse_kl(t, z).per_token)
    mix = 0.1 * p + 0.9 * q
    torch.testing.assert_close(skew_kl(t, z, alpha=0.1).per_token, (p * (p / mix).log()).sum(-1))
    rmix = 0.9 * p + 0.1 * q
    torch.testing.assert_close(skew_kl(t, z, alpha=0.1, reverse=True).per_token, (q * (q / rmix).log()).sum(-1))
    torch.testing.assert_close(tvd(t, z).per_token, 0.5 * (p - q).abs().sum(-1))
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"}
    torch.testing.assert_close(Divergence("jsd", beta=0.5)(t, z).sum, generalized_jsd(t, z, beta=0.5).sum)


def test_temperature_scaling_and_soften_target():
    lp, w, z = data()
    t = linear_pool(lp, w)
    T = 2.0
    out = forward_kl(t, z, temperature=T)
    ref = kl_per_token(torch.log_softmax(t / T, -1), torch.log_softmax(z / T, -1)) * T * T
    torch.testing.assert_close(out.per_token, ref)
    pre = forward_kl(torch.log_softmax(t / T, -1), z, temperature=T, soften_target=False)
    torch.testing.assert_close(pre.sum, out.sum)


def test_masks_and_counts():
    lp, w, z = data()
    t = linear_pool(lp, w)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    for fn in DIVERGENCES.values():
        out = fn(t, z, mask=mask)
        full = fn(t, z)
        assert int(out.count) == int(mask.sum())
        torch.testing.assert_close(out.sum, full.per_token[mask].sum())
        torch.testing.assert_close(out.mean, full.per_token[mask].mean())
    empty = forward_kl(t, z, mask=torch.zeros(4, 5, dtype=torch.bool))
    assert float(empty.mean) == 0.0 and int(empty.count) == 0


def test_token_count_normalisation_is_exact_under_gradient_accumulation():
    lp, w, z = data(B=6)
    t = linear_pool(lp, w)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:2, 3:] = False  # uneven micro-batches
    zf = z.clone().requires_grad_(True)
    forward_kl(t, zf, mask=mask).mean.backward()
    za = z.clone().requires_grad_(True)
    parts = [forward_kl(t[i:i + 2], za[i:i + 2], mask=mask[i:i + 2]) for i in (0, 2, 4)]
    total = sum(int(p.count) for p in parts)
    for part in parts:
        part.normalized(total).backward()
    torch.testing.assert_close(za.grad, zf.grad)
    acc = parts[0] + parts[1] + parts[2]
    torch.testing.assert_close(acc.mean, forward_kl(t, z, mask=mask).mean)
    # averaging per-micro-batch means would be wrong here
    assert not torch.allclose(sum(p.mean for p in parts) / 3, acc.mean)


def test_zero_probabilities_no_nan():
    t = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    z = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    for fn in DIVERGENCES.values():
        out = fn(t, z)
        assert not bool(torch.isnan(out.per_token).any())
    fwd = forward_kl(t, z)
    fwd.sum.backward()
    assert bool(torch.isfinite(z.grad).all())
    assert math.isinf(float(reverse_kl(t, z.detach()).sum))  # q > 0 where p = 0: +inf, not NaN
    zinf = torch.tensor([[0.0, -math.inf, 0.0]], dtype=torch.float64)
    assert math.isinf(float(forward_kl(t[:1], zinf).sum))


def test_argument_validation():
    lp, w, z = data()
    t = linear_pool(lp, w)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(t, z[..., :5])
    with pytest.raises(ValueError, match="mask"):
        forward_kl(t, z, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(t, z, temperature=0.0)
    with pytest.raises(ValueError, match="student_logits"):
        forward_kl(t, torch.full_like(z, float("nan")))
    with pytest.raises(ValueError, match="unknown divergence"):
        Divergence("hellinger")
    assert isinstance(forward_kl(t, z), DivergenceOutput)


def test_kl_per_token_zero_in_both_is_zero_and_student_logp_is_used_as_given():
    """0·log(0/0) = 0 (the masked fallback), not NaN; ``student_logp`` replaces the internal log_softmax."""
    a = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    b = torch.log(torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64))
    kl = kl_per_token(a, b)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, torch.tensor([0.5 * math.log(2) + 0.5 * math.log(2 / 3), math.log(2)],
                                                dtype=torch.float64))
    lp, w, z = data()
    target = linear_pool(lp, w)
    for fn in DIVERGENCES.values():
        ref = fn(target, z)
        shared = fn(target, z, student_logp=torch.log_softmax(z, -1))
        assert torch.equal(ref.per_token, shared.per_token)
    with pytest.raises(ValueError, match="student_logp"):
        forward_kl(target, z, student_logp=torch.log_softmax(z, -1)[..., :-1])
