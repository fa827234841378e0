"""The stable redistribution form against a brute-force float64 computation from explicit weights."""

from __future__ import annotations

import torch

from sinkguard.interventions.redistribution import redistributed_attention


def brute_force(query, keys, values, visible, targets, beta, scale):
    """Explicit probabilities: targets scaled by beta, the removed mass spread over the others."""
    q, k, v = query.double(), keys.double(), values.double()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(q.shape[0]):
            seen = visible[i]
            probs = torch.softmax((q[i, h] @ kh[seen].T) * scale, dim=-1)
            hit = targets[seen]
            mass = probs[hit].sum()
            if (~hit).any():
                b = float(beta[h]) if torch.is_tensor(beta) else beta
                probs = torch.where(hit, b * probs, probs * (1 - b * mass) / (1 - mass))
            out[i, h] = probs @ vh[seen]
    return out


def case(seed: int, sink_logit: float = 0.0):
    torch.manual_seed(seed)
    q = torch.randn(7, 6, 8, dtype=torch.float64)
    k = torch.randn(7, 2, 8, dtype=torch.float64)
    v = torch.randn(7, 2, 8, dtype=torch.float64)
    k[2] = q[:, 0].mean(0) * sink_logit  # a key most queries align with: a strong sink when sink_logit is large
    visible = torch.ones(7, 7, dtype=torch.bool).tril()
    targets = torch.zeros(7, dtype=torch.bool)
    targets[2] = True
    return q, k, v, visible, targets


def test_matches_brute_force_in_float64():
    for seed in range(3):
        args = case(seed)
        for beta in (0.0, 0.3, 1.0, torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64)):
            got = redistributed_attention(*args, beta=beta, scale=8**-0.5)
            assert torch.allclose(got, brute_force(*args, beta=beta, scale=8**-0.5), atol=1e-10)


def test_beta_one_is_plain_attention_and_rows_without_other_keys_are_unchanged():
    q, k, v, visible, targets = case(4)
    plain = redistributed_attention(q, k, v, visible, torch.zeros_like(targets), beta=0.0, scale=0.3)
    assert torch.allclose(redistributed_attention(q, k, v, visible, targets, beta=1.0, scale=0.3), plain, atol=1e-12)
    only_target = torch.zeros_like(visible)
    only_target[:, 2] = True
    only_target[:2, :2] = torch.eye(2, dtype=torch.bool)  # rows 0, 1 see only their own key
    edited = redistributed_attention(q, k, v, only_target, targets, beta=0.0, scale=0.3)
    plain = redistributed_attention(q, k, v, only_target, torch.zeros_like(targets), beta=0.0, scale=0.3)
    assert torch.equal(edited[2], plain[2])  # query 2 sees only the target: unchanged


def test_stable_in_float32_when_the_sink_takes_almost_all_the_mass():
    q, k, v, visible, targets = case(5, sink_logit=30.0)
    reference = brute_force(q, k, v, visible, targets, 0.3, 8**-0.5)
    got = redistributed_attention(q.float(), k.float(), v.float(), visible, targets, beta=0.3, scale=8**-0.5)
    assert (got.double() - reference).abs().max() < 1e-5
