"""Chunked attention with received mass vs a dense reference computation."""

from __future__ import annotations

import math

import pytest
import torch

from sinkguard.core.attention import (
    AttentionVariant,
    attention_with_received_mass,
    sink_scores_from_received,
    uniform_share,
    visible_queries,
)


def dense(query, key, value, scale):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    length = query.shape[2]
    scores = (query @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.triu(torch.ones(length, length, dtype=torch.bool), 1), float("-inf"))
    probs = scores.softmax(-1)
    return probs @ v, probs.sum(-2)


@pytest.mark.parametrize(("length", "chunk", "heads", "kv_heads"), [(37, 8, 4, 2), (64, 64, 3, 3), (100, 33, 6, 1)])
def test_matches_dense_attention(length, chunk, heads, kv_heads):
    torch.manual_seed(length)
    q = torch.randn(1, heads, length, 32)
    k = torch.randn(1, kv_heads, length, 32)
    v = torch.randn(1, kv_heads, length, 32)
    out, received = attention_with_received_mass(q, k, v, 1 / math.sqrt(32), chunk=chunk)
    ref_out, ref_received = dense(q, k, v, 1 / math.sqrt(32))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received, ref_received, atol=1e-5, rtol=1e-5)
    # every query distributes exactly one unit of attention
    assert received.sum(-1) == pytest.approx(torch.full((1, heads), float(length)), rel=1e-5)


def test_output_matches_torch_sdpa():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 32) for _ in range(3))
    out, _ = attention_with_received_mass(q, k, v, 32**-0.5, chunk=16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_scores_need_min_votes():
    received = torch.tensor([[10.0, 4.0, 1.0, 0.5]])
    scores = sink_scores_from_received(received, min_votes=2)
    assert scores[0, :3].tolist() == pytest.approx([2.5, 4.0 / 3, 0.5])
    assert torch.isnan(scores[0, 3])


def dense_variant(query, key, value, scale, window=None, softcap=None, sinks=None):
    """The textbook computation, materialising every probability (float64)."""
    groups = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    length = q.shape[2]
    logits = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        column = sinks.double().reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        probs = torch.cat((logits, column), -1).softmax(-1)[..., :-1]
    else:
        probs = logits.softmax(-1)
    return (probs @ v).float(), probs.sum(-2).float()


@pytest.mark.parametrize(("window", "softcap", "with_sinks"), [(7, None, False), (16, 5.0, False), (None, 3.0, True),
                                                                 (5, None, True), (200, None, False)])
def test_variants_match_the_textbook_computation(window, softcap, with_sinks):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 61, 32) * 2, torch.randn(1, 2, 61, 32) * 2, torch.randn(1, 2, 61, 32)
    sinks = torch.randn(4) * 2 if with_sinks else None
    variant = AttentionVariant(sliding_window=window, softcap=softcap, sink_logits=sinks)
    out, received = attention_with_received_mass(q, k, v, 32**-0.5, chunk=9, variant=variant)
    ref_out, ref_received = dense_variant(q, k, v, 32**-0.5, window, softcap, sinks)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received, ref_received, atol=1e-5, rtol=1e-5)
    if not with_sinks:  # each query hands out exactly one unit (a sink logit keeps some for itself)
        assert received.sum(-1) == pytest.approx(torch.full((1, 4), 61.0), rel=1e-5)


def test_explicit_boolean_mask_is_honoured():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 20, 32) for _ in range(3))
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 3] = False  # nobody may look at key 3
    out, received = attention_with_received_mass(q, k, v, 32**-0.5, chunk=6, mask=mask)
    assert received[..., 3].abs().max() == 0
    additive = torch.zeros(1, 1, 20, 20).masked_fill(~mask, float("-inf"))
    out_additive, _ = attention_with_received_mass(q, k, v, 32**-0.5, chunk=6, mask=additive)
    torch.testing.assert_close(out, out_additive)


def test_uniform_share_and_visible_queries_by_brute_force():
    length, window = 40, 9
    for w in (None, window):
        seen = [min(i + 1, w or length) for i in range(length)]
        expected = []
        for j in range(length):
            queries = [i for i in range(j, length) if w is None or i - j < w]
            expected.append(sum(1 / seen[i] for i in queries) / len(queries))
        assert uniform_share(length, w).tolist() == pytest.approx(expected, rel=1e-6)
        votes = [sum(1 for i in range(j, length) if w is None or i - j < w) for j in range(length)]
        assert visible_queries(length, w).tolist() == votes
