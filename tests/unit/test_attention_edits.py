"""Attention edits: plans, the sinks each query is steered from, and batching across requests."""

from __future__ import annotations

import numpy as np
import torch

from sinkguard.interventions.attention_edits import SinkMemory, redistribute_group
from sinkguard.interventions.plan import RequestSlice, apply_attention_edits, build_plan
from sinkguard.interventions.policy import Policy
from sinkguard.interventions.redistribution import redistributed_attention
from sinkguard.interventions.specs import AttentionRedistribution, FirstTokenScaling


def test_sinks_are_targeted_from_the_layer_after_they_form():
    memory = SinkMemory()
    memory.flag("a", np.array([5, 3]), layer=2)
    memory.flag("a", np.array([5, 9]), layer=1)  # 5 is seen forming lower: its birth layer is 1
    assert memory.targets("a", 1).tolist() == []
    assert memory.targets("a", 2).tolist() == [5, 9]
    assert memory.targets("a", 3).tolist() == [3, 5, 9]
    memory.forget("a")
    assert memory.targets("a", 3).size == 0 and memory.targets("b", 3).size == 0


def test_plan_places_attention_edits_by_layer_phase_and_request():
    act = Policy(name="act", interventions=[AttentionRedistribution(beta=0.0, layers=[4, 6], phases=["decode"])])
    zero = Policy(name="zero", interventions=[FirstTokenScaling(gamma=0.5, heads=[1])])
    pieces = [RequestSlice(0, 0, 5, 0, 5, act, "r0"),  # all prefill: no ACT query, but its sinks are watched
              RequestSlice(1, 5, 6, 40, 30, act, "r1"),  # one decode token
              RequestSlice(2, 6, 9, 0, 9, zero, "r2")]
    plan = build_plan(pieces, forming_layers=[2], num_layers=8)
    assert [w.key for w in plan.watches] == ["r0", "r1"] and plan.watch_layers == frozenset({2})
    assert [(e.key, e.start, e.end, e.first_position) for e in plan.attention[4]] == [("r1", 5, 6, 40),
                                                                                     ("r2", 6, 9, 0)]
    assert sorted(plan.attention) == list(range(8))  # ZeroTuning without layers: every layer
    assert all(e.key == "r2" for e in plan.attention[0])


def test_batched_requests_get_exactly_what_each_would_alone():
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    lengths = [7, 12, 3]
    contexts = [(torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)) for n in lengths]
    query = torch.randn(3, heads, dim)  # one decode query per request, at its last position
    policy = Policy(name="act", interventions=[AttentionRedistribution(beta=0.25, heads=[0, 3], layers=[5])])
    pieces = [RequestSlice(i, i, i + 1, n - 1, 1, policy, f"r{i}") for i, n in enumerate(lengths)]
    plan = build_plan(pieces, forming_layers=[1])
    memory = SinkMemory()
    for i, sinks in enumerate(([2, 4], [1], [])):
        memory.flag(f"r{i}", np.array(sinks, dtype=np.int64), layer=1)

    def read(edits, kv):  # head-major [h, B, K, D], padded
        width = max(lengths[e.request] for e in edits)
        keys = torch.zeros(len(kv), len(edits), width, dim)
        values = torch.zeros_like(keys)
        for row, edit in enumerate(edits):
            k, v = contexts[edit.request]
            keys[:, row, : len(k)], values[:, row, : len(v)] = k[:, kv].transpose(0, 1), v[:, kv].transpose(0, 1)
        return keys, values, torch.tensor([lengths[e.request] for e in edits])

    plain = torch.randn(3, heads, dim)
    out = plain.clone()
    applied = apply_attention_edits(5, plan, memory, 0, 0.3, None, query, out, read, kv_heads)
    assert [(a.requests.tolist(), a.positions.tolist(), a.edited_rows) for a in applied] == [
        ([0, 0], [2, 4], 1), ([1], [1], 1)]  # request 2 has no sinks: nothing to do
    for i, n in enumerate(lengths[:2]):
        k, v = contexts[i]
        targets = torch.zeros(n, dtype=torch.bool)
        targets[memory.targets(f"r{i}", 5)] = True
        alone = redistributed_attention(query[i:i + 1], k, v, torch.ones(1, n, dtype=torch.bool), targets, 0.25, 0.3)
        assert torch.allclose(out[i, [0, 3]], alone[0, [0, 3]], atol=1e-6)
        assert torch.equal(out[i, [1, 2]], plain[i, [1, 2]])  # heads not edited keep the kernel's output
    assert torch.equal(out[2], plain[2])
    assert redistribute_group(plan.attention[5][2].intervention, [plan.attention[5][2]], [np.array([], dtype=np.int64)],
                              query, out, read, kv_heads, 0.3, None) == ([0], [0])
