"""Causal attention that also returns how much attention every key receives.

Sink scores need the attention *received* per key, which fused kernels (SDPA, flash, paged)
never expose. Materialising the full ``[H, T, T]`` map for every layer is what makes the naive
route cost ~20 GB at T=4096. Here queries are processed in chunks: each chunk's probabilities
are used once for the output (``P @ V``) and once for the per-key column sums, then dropped.
Peak extra memory is ``heads x chunk x K`` floats for one layer, where K is the keys a chunk can
see (all earlier keys, or ``chunk + window`` with a sliding window); compute is the same as eager
attention, done once.

What a model's attention does beyond ``softmax(QK^T * scale)`` is honoured here, exactly:

- a sliding window (Gemma 2/3, Mistral, gpt-oss local layers): query i sees keys
  ``i - window < j <= i`` (the convention of transformers and vLLM); only the band is computed;
- logit soft-capping (Gemma 2): ``cap * tanh(logits / cap)`` before masking;
- learned sink logits (gpt-oss ``sinks``): one extra logit per head for a virtual key whose value
  is zero; it takes probability mass but receives none that a real key could be charged with;
- an explicit mask from the model (boolean: True = visible; float: added to the logits),
  combined with the causal/band mask.

The same function is where attention interventions (e.g. ACT-style redistribution) plug in:
``transform`` may rewrite each chunk's probabilities before they are applied to V.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ProbabilityTransform = Callable[[torch.Tensor, int, int, int], torch.Tensor]
"""``transform(probs[B, G, C, K], kv_head, query_start, query_end) -> probs`` for one chunk: the
probabilities of query heads ``kv_head * G ... (kv_head + 1) * G - 1`` (GQA group ``kv_head``)
over the keys ``key_start(query_start) ... query_end - 1``."""


@dataclass(frozen=True)
class AttentionVariant:
    """What one attention layer does beyond plain causal softmax attention."""

    sliding_window: int | None = None
    """Keys visible to query i: ``i - sliding_window < j <= i`` (None: every earlier key)."""
    softcap: float | None = None
    """Logit soft-capping ``cap * tanh(x / cap)`` (None: off)."""
    sink_logits: torch.Tensor | None = None
    """``[Hq]`` learned per-head logits of a virtual key with value zero (None: none)."""

    def key_start(self, query_start: int) -> int:
        """First key any query of a chunk starting at ``query_start`` can see."""
        return 0 if self.sliding_window is None else max(0, query_start - self.sliding_window + 1)


def visible_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None
                 ) -> torch.Tensor:
    """Boolean ``[Q, K]``: key j is visible to query i (``j <= i``, and ``i - window < j``)."""
    rows, cols = query_positions[:, None], key_positions[None, :]
    visible = cols <= rows
    if sliding_window is not None:
        visible &= cols > rows - sliding_window
    return visible


def visible_queries(length: int, sliding_window: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[T]``: how many queries (itself included) see key j: ``T - j``, capped by the window."""
    votes = torch.arange(length, 0, -1, device=device, dtype=torch.float32)
    return votes if sliding_window is None else votes.clamp_max(float(sliding_window))


def attention_with_received_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    chunk: int = 128,
    transform: ProbabilityTransform | None = None,
    variant: AttentionVariant | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over one full sequence (no cache, no padding).

    Args:
        query: ``[B, Hq, T, d]`` (after rotary embedding).
        key, value: ``[B, Hkv, T, d]``; ``Hq`` must be a multiple of ``Hkv`` (GQA).
        chunk: queries per step. Small chunks keep each step's ``G x chunk x K`` probabilities in
            cache (the elementwise passes, not the matmuls, dominate on CPU) and skip more of
            the masked upper triangle.
        variant: sliding window, soft-capping, sink logits (see :class:`AttentionVariant`).
        mask: optional ``[B or 1, Hq or 1, T, T]`` mask from the model (boolean, True = visible,
            or additive float), applied on top of the causal/band mask.
    Returns:
        ``(output [B, Hq, T, d], received [B, Hq, T])`` where ``received[..., j]`` is the sum
        over the queries that see key j of the attention probability they give it (float32).
    """
    variant = variant or AttentionVariant()
    batch, num_q_heads, length, head_dim = query.shape
    num_kv_heads = key.shape[1]
    groups = num_q_heads // num_kv_heads
    # Group query heads under their shared KV head (no repeat_kv copy); fold the scale into Q.
    q = (query * scale).reshape(batch, num_kv_heads, groups, length, head_dim)
    output = torch.empty_like(q)
    received = torch.zeros(batch, num_kv_heads, groups, length, dtype=torch.float32, device=query.device)
    sinks = None
    if variant.sink_logits is not None:
        sinks = variant.sink_logits.float().reshape(num_kv_heads, groups, 1, 1).to(query.device)
    if mask is not None:
        mask = mask.expand(batch, num_q_heads, length, length).reshape(batch, num_kv_heads, groups, length, length)
    positions = torch.arange(length, device=query.device)
    for head in range(num_kv_heads):
        k = key[:, head, None]  # [B, 1, T, d]
        v = value[:, head, None]
        for start in range(0, length, chunk):
            end = min(length, start + chunk)
            lo = variant.key_start(start)
            scores = torch.matmul(q[:, head, :, start:end], k[:, :, lo:end].transpose(-1, -2)).float()
            if variant.softcap is not None:
                scores = torch.tanh(scores / variant.softcap) * variant.softcap
            scores.masked_fill_(~visible_keys(positions[start:end], positions[lo:end], variant.sliding_window),
                                float("-inf"))
            if mask is not None:
                block = mask[:, head, :, start:end, lo:end]
                if block.dtype == torch.bool:
                    scores.masked_fill_(~block, float("-inf"))
                else:
                    scores += block.float()
            if sinks is None:
                probs = torch.softmax(scores, dim=-1)
            else:  # the virtual sink key takes its share of the normaliser, then is dropped
                normaliser = torch.logsumexp(
                    torch.cat((scores, sinks[head].expand(*scores.shape[:-1], 1)), dim=-1), dim=-1, keepdim=True)
                probs = torch.exp(scores - normaliser)
            if transform is not None:
                probs = transform(probs, head, start, end)
            received[:, head, :, lo:end] += probs.sum(dim=-2)
            output[:, head, :, start:end] = torch.matmul(probs.to(value.dtype), v[:, :, lo:end])
    return (
        output.reshape(batch, num_q_heads, length, head_dim),
        received.reshape(batch, num_q_heads, length),
    )


def sink_scores_from_received(
    received: torch.Tensor, min_votes: int, sliding_window: int | None = None
) -> torch.Tensor:
    """Mean attention each key receives from the queries that can see it.

    ``received`` is ``[..., T]``; key j is seen by ``T - j`` queries (itself included), at most
    ``sliding_window``. Keys with fewer than ``min_votes`` queries are NaN: a score from two
    queries is not evidence.
    """
    votes = visible_queries(received.shape[-1], sliding_window, received.device)
    scores = received / votes
    return scores.masked_fill(votes < min_votes, float("nan"))


def uniform_share(length: int, sliding_window: int | None = None) -> torch.Tensor:
    """``[T]``: the sink score key j would have if every query spread its attention evenly over
    the keys it sees (query i sees ``min(i + 1, window)`` keys): the baseline a sink is judged by.
    """
    positions = torch.arange(length, dtype=torch.float64)
    seen = positions + 1 if sliding_window is None else (positions + 1).clamp_max(sliding_window)
    share = 1.0 / seen  # what query i gives each key it sees
    # mean over the queries i that see key j: i in [j, min(T, j + window) - 1]
    prefix = torch.cat((torch.zeros(1, dtype=torch.float64), torch.cumsum(share, 0)))
    first = torch.arange(length)
    last = first + length if sliding_window is None else first + sliding_window
    last = last.clamp_max(length)
    return ((prefix[last] - prefix[first]) / (last - first)).float()
