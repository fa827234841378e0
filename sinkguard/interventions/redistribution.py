"""Attention-mass redistribution away from chosen keys, in the numerically stable form both engines use.

For one query with attention probabilities ``a`` over its visible keys and a set ``S`` of target keys
(the request's secondary sinks for ACT; the primary sink for first-token scaling), the edit keeps
``beta * a_s`` on each target and gives the removed mass to the other keys in proportion to their
weights::

    o' = beta * sum_{s in S} a_s v_s + (1 - beta * A) * o_notS,     A = sum_{s in S} a_s

where ``o_notS`` is softmax attention over the visible non-target keys only. Nothing here forms
``1 - A`` by subtraction, which cancels catastrophically when a sink takes almost all the mass (the
normal case: A = 0.99998 gave errors of 0.06 in float32 with the post-hoc identity): the weight is
``exp(lse_notS - lse) + (1 - beta) * A``. Logits, log-sum-exps and the sums are float32 (or the
inputs' dtype if wider). A query with no visible non-target key is left unchanged.
"""

from __future__ import annotations

import torch


def redistributed_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    targets: torch.Tensor,
    beta: float | torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention output with the mass on ``targets`` scaled by ``beta``.

    ``query`` [..., Q, H, D]; ``keys`` / ``values`` [..., K, Hkv, D] (grouped-query heads share a KV
    head: query head h reads KV head h // (H / Hkv)); ``visible`` [..., Q, K] bool (causal / window
    / padding mask); ``targets`` [..., Q, K] or [..., K] bool; ``beta`` a float or a per-head tensor
    [H] in [0, 1]. Leading dimensions (``...``) batch independent requests. Returns [..., Q, H, D] in
    float32 (float64 inputs stay float64).
    """
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    num_heads, num_kv = query.shape[-2], keys.shape[-2]
    group = num_heads // num_kv
    q = query.to(dtype).transpose(-3, -2)  # [..., H, Q, D]
    k = keys.to(dtype).transpose(-3, -2)  # [..., Hkv, K, D]
    v = values.to(dtype).transpose(-3, -2)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)  # [..., H, K, D]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., H, Q, K]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=logits.device)
    seen = visible.unsqueeze(-3)  # [..., 1, Q, K]
    logits = torch.where(seen, logits, neg_inf)
    if targets.dim() == visible.dim() - 1:
        targets = targets.unsqueeze(-2)
    target = (targets & visible).unsqueeze(-3)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [..., H, Q, 1]
    other_logits = torch.where(target, neg_inf, logits)
    lse_other = torch.logsumexp(other_logits, dim=-1, keepdim=True)
    has_other = torch.isfinite(lse_other)
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)  # rows that see nothing (padding) stay finite
    target_probs = torch.where(target, torch.exp(logits - finite_lse), torch.zeros((), dtype=dtype))
    mass = target_probs.sum(-1, keepdim=True)  # A
    other_out = torch.matmul(torch.exp(other_logits - torch.where(has_other, lse_other, 0.0)), v)  # o_notS
    beta_t = torch.as_tensor(beta, dtype=dtype, device=logits.device).reshape(-1, 1, 1)
    other_weight = torch.exp(torch.where(has_other, lse_other - lse, neg_inf)) + (1 - beta_t) * mass
    edited = beta_t * torch.matmul(target_probs, v) + other_weight * other_out
    plain = torch.matmul(torch.exp(logits - finite_lse), v)
    return torch.where(has_other, edited, plain).transpose(-3, -2)  # [..., Q, H, D]
