"""Chunked attention with received mass vs a dense reference computation."""

from __future__ import annotations

import math

import pytest
import torch

from sinkguard.core.attention import attention_with_received_mass, sink_scores_from_received


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
