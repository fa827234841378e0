"""Causal attention that also returns how much attention every key receives.

Sink scores need the attention *received* per key, which fused kernels (SDPA, flash, paged)
never expose. Materialising the full ``[H, T, T]`` map for every layer is what makes the naive
route cost ~20 GB at T=4096. Here queries are processed in chunks: each chunk's probabilities
are used once for the output (``P @ V``) and once for the per-key column sums, then dropped.
Peak extra memory is ``heads x chunk x T`` floats for one layer; compute is the same as eager
attention, done once.

The same function is where attention interventions (e.g. ACT-style redistribution) plug in:
``transform`` may rewrite each chunk's probabilities before they are applied to V.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ProbabilityTransform = Callable[[torch.Tensor, int, int, int], torch.Tensor]
"""``transform(probs[B, G, C, K], kv_head, query_start, query_end) -> probs`` for one chunk: the
probabilities of query heads ``kv_head * G ... (kv_head + 1) * G - 1`` (GQA group ``kv_head``)."""


def attention_with_received_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    chunk: int = 128,
    transform: ProbabilityTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over one full sequence (no cache, no padding).

    Args:
        query: ``[B, Hq, T, d]`` (after rotary embedding).
        key, value: ``[B, Hkv, T, d]``; ``Hq`` must be a multiple of ``Hkv`` (GQA).
        chunk: queries per step. Small chunks keep each step's ``G x chunk x T`` probabilities in
            cache (the elementwise passes, not the matmuls, dominate on CPU) and skip more of
            the masked upper triangle.
    Returns:
        ``(output [B, Hq, T, d], received [B, Hq, T])`` where ``received[..., j]`` is the sum
        over queries i >= j of the attention probability i gives to key j (float32).
    """
    batch, num_q_heads, length, head_dim = query.shape
    num_kv_heads = key.shape[1]
    groups = num_q_heads // num_kv_heads
    # Group query heads under their shared KV head (no repeat_kv copy); fold the scale into Q.
    q = (query * scale).reshape(batch, num_kv_heads, groups, length, head_dim)
    output = torch.empty_like(q)
    received = torch.zeros(batch, num_kv_heads, groups, length, dtype=torch.float32, device=query.device)
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu(1)
    for head in range(num_kv_heads):
        k = key[:, head, None]  # [B, 1, T, d]
        v = value[:, head, None]
        for start in range(0, length, chunk):
            end = min(length, start + chunk)
            size = end - start
            scores = torch.matmul(q[:, head, :, start:end], k[:, :, :end].transpose(-1, -2)).float()
            # Keys before the chunk are visible to every query in it: mask the diagonal block only.
            scores[..., start:end].masked_fill_(future[:size, :size], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if transform is not None:
                probs = transform(probs, head, start, end)
            received[:, head, :, :end] += probs.sum(dim=-2)
            output[:, head, :, start:end] = torch.matmul(probs.to(value.dtype), v[:, :, :end])
    return (
        output.reshape(batch, num_q_heads, length, head_dim),
        received.reshape(batch, num_q_heads, length),
    )


def sink_scores_from_received(received: torch.Tensor, min_votes: int) -> torch.Tensor:
    """Mean attention each key receives from the queries that can see it.

    ``received`` is ``[..., T]``; key j is seen by ``T - j`` queries (itself included). Keys
    with fewer than ``min_votes`` queries are NaN: a score from two queries is not evidence.
    """
    length = received.shape[-1]
    votes = torch.arange(length, 0, -1, device=received.device, dtype=torch.float32)
    scores = received / votes
    return scores.masked_fill(votes < min_votes, float("nan"))
