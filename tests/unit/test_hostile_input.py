"""What one hostile or unlucky request can send: parameters strictly typed, finite and bounded, a
cost budget per policy, JSON bounded in depth, and whatever a policy computes, nothing non-finite
written into the model's activations (the edit is skipped for that token and counted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sinkguard.errors import ConfigError
from sinkguard.interventions.plan import FormationRule, RequestSlice, apply_attention_edits, apply_mlp_edits, build_plan
from sinkguard.interventions.policy import ModelScope, Policy, PolicySet, attention_share, check_scope, load_policies
from sinkguard.interventions.specs import MlpNormClamp, keep_finite
from sinkguard.serving.options import RequestOptions
from sinkguard.serving.request_body import MAX_JSON_DEPTH, parse_json_body

SCOPE = ModelScope(num_layers=30, num_heads=9, forming_layers=(2,))
INLINE = PolicySet(allow_inline=True)


def inline(interventions: list[dict] | dict) -> str:
    return json.dumps({"interventions": interventions} if isinstance(interventions, list) else interventions)


@pytest.mark.parametrize("sent,named", [
    ('{"interventions": [{"kind": "mlp_norm_clamp", "target_norm": Infinity}]}', "target_norm"),
    ('{"interventions": [{"kind": "mlp_norm_clamp", "target_norm": NaN}]}', "target_norm"),
    ('{"interventions": [{"kind": "mlp_norm_clamp", "target_norm": 1e300}]}', "less than or equal to 10000"),
    ('{"interventions": [{"kind": "mlp_norm_clamp", "relative_norm": 1e9}]}', "relative_norm"),
    ('{"interventions": [{"kind": "mlp_projection_removal", "alpha": true}]}', "alpha"),
    ('{"interventions": [{"kind": "first_token_scaling", "gamma": "0.5"}]}', "gamma"),
    ('{"interventions": [{"kind": "first_token_scaling", "layers": [1, 1]}]}', "duplicates"),
    ('{"interventions": [{"kind": "first_token_scaling", "layers": []}]}', "layers"),
    ('{"interventions": [{"kind": "first_token_scaling", "phases": ["decode", "decode"]}]}', "duplicates"),
    ('{"interventions": [{"kind": "first_token_scaling"}, {"kind": "first_token_scaling"}]}', "repeats"),
    ('{}', "at least one intervention"),
    ('{"interventions": []}', "at least one intervention"),
    ("[" * 8000 + "]" * 8000, "nested too deeply"),
])
def test_inline_policies_are_strict_finite_and_bounded(sent, named):
    with pytest.raises(ConfigError, match=named):
        RequestOptions(inline_policy=sent).resolved_policy(INLINE, SCOPE)


@pytest.mark.parametrize("extra,named", [
    ({"sinkguard_detect": "yes"}, "sinkguard_detect"),
    ({"sinkguard_detect": 1}, "sinkguard_detect"),
    ({"sinkguard_max_events": "10"}, "sinkguard_max_events"),
    ({"sinkguard_max_events": 10.0}, "sinkguard_max_events"),
    ({"sinkguard_policy": 3}, "sinkguard_policy"),
])
def test_request_options_are_not_coerced(extra, named):
    with pytest.raises(ConfigError, match=named):
        RequestOptions.from_extra_args(extra)
    assert RequestOptions.from_extra_args({"sinkguard_detect": False, "sinkguard_max_events": 10}).max_events == 10


def test_a_policy_file_with_a_non_finite_parameter_does_not_load(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policies:\n  - name: p\n    interventions:\n      - {kind: mlp_norm_clamp, target_norm: .inf}\n")
    with pytest.raises(ConfigError, match="target_norm"):
        load_policies(path)


def test_the_cost_budget_refuses_stacked_attention_edits_naming_itself():
    one = [{"kind": "first_token_scaling", "gamma": 0.5}]  # every head of every layer: share 1.0
    assert attention_share(RequestOptions(inline_policy=inline(one)).resolved_policy(INLINE, SCOPE), SCOPE) == 1.0
    stacked = [{"kind": "first_token_scaling", "gamma": 0.5 + i / 1000} for i in range(3)]
    with pytest.raises(ConfigError, match=r"budget.attention_share = 1\b"):
        RequestOptions(inline_policy=inline(stacked)).resolved_policy(INLINE, SCOPE)
    many = [{"kind": "mlp_projection_removal", "alpha": i / 100} for i in range(65)]
    with pytest.raises(ConfigError, match="budget.max_interventions = 64"):
        RequestOptions(inline_policy=inline(many)).resolved_policy(INLINE, SCOPE)
    roomy = PolicySet(allow_inline=True, budget={"attention_share": 3.0})  # configurable
    assert len(RequestOptions(inline_policy=inline(stacked)).resolved_policy(roomy, SCOPE).interventions) == 3
    named = Policy.model_validate({"name": "heavy", "interventions": stacked})
    with pytest.raises(ConfigError, match="policy 'heavy'.*budget.attention_share"):  # named policies too
        check_scope([named], SCOPE, PolicySet().budget)


def test_json_bodies_are_bounded_in_depth():
    assert parse_json_body(b'{"model": "m", "messages": [{"content": [{"type": "text"}]}]}')["model"] == "m"
    assert parse_json_body(b"not json") is None  # vLLM answers that itself
    assert parse_json_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    for body in (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b'{"a":' * 5000 + b"1" + b"}" * 5000):
        with pytest.raises(ConfigError, match="nested deeper"):
            parse_json_body(body)


def test_a_non_finite_edit_is_skipped_for_its_tokens_and_reported():
    """Whatever a policy computes (here a clamp built past validation, as a future bug might), the
    edited rows that would be non-finite keep their values; the others are edited."""
    torch.manual_seed(0)
    direction = torch.randn(16)
    rule = FormationRule(direction / direction.norm(), 1.0, 0.0, 0.0)
    mlp_out = torch.randn(6, 16)
    mlp_out[2] = 0.0  # a zero row: target / norm -> inf * 0 = nan under an infinite target
    before = mlp_out.clone()
    bad = MlpNormClamp.model_construct(kind="mlp_norm_clamp", layers=[3], phases=["prefill", "decode"],
                                       target_norm=float("inf"), relative_norm=None)
    policy = Policy.model_construct(name="bad", interventions=[bad])
    plan = build_plan([RequestSlice(0, 0, 3, 1, 10, policy, "a"), RequestSlice(1, 3, 6, 1, 10, policy, "b")], [3])
    plan.mlp[3][0].flagged_only = False
    (applied,) = apply_mlp_edits(3, mlp_out, plan, rule)
    assert torch.isfinite(mlp_out).all() and torch.equal(mlp_out, before)  # inf / nan rows kept their values
    assert sorted(applied.nonfinite.tolist()) == [0, 0, 0, 1, 1, 1] and applied.count == 0
    finite, mask = keep_finite(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]), torch.zeros(2, 2))
    assert mask.tolist() == [True, False] and finite.tolist() == [[0.0, 0.0], [2.0, 3.0]]


def test_attention_edits_never_write_non_finite_outputs():
    from sinkguard.interventions.attention_edits import SinkMemory
    from sinkguard.interventions.specs import FirstTokenScaling

    torch.manual_seed(0)
    n, heads, dim = 5, 2, 8
    query, out = torch.randn(n, heads, dim), torch.randn(n, heads, dim)
    keys, values = torch.randn(heads, 1, n, dim), torch.randn(heads, 1, n, dim)
    values[:, :, 0] = float("inf")  # a corrupt cache row: the redistributed output would be non-finite
    before = out.clone()
    policy = Policy(name="zero", interventions=[FirstTokenScaling(gamma=0.5, layers=[0])])
    plan = build_plan([RequestSlice(0, 0, n, 0, n, policy, "a")], [], 0, 1)
    applied = apply_attention_edits(0, plan, SinkMemory(), 0, dim ** -0.5, None, query, out,
                                    lambda edits, kv: (keys, values, torch.tensor([n])), heads)
    assert torch.equal(out, before) and torch.isfinite(out).all()
    (edit,) = applied
    assert edit.count == 0 and len(edit.nonfinite) == n and np.all(edit.nonfinite == 0)


def test_the_worker_reads_options_as_vllm_coerced_them():
    """The API server checks the client's JSON strictly; vLLM's protocol then turns ``false`` into ``0``
    (its ``vllm_xargs`` holds str | int | float), and the worker and the cache salt must still read it."""
    from sinkguard.serving.records import RequestTracker

    coerced = {"sinkguard_detect": 0, "sinkguard_max_events": 3}
    with pytest.raises(ConfigError):
        RequestOptions.from_extra_args(coerced)
    record = RequestTracker().get("cmpl-a-0-1a2b3c4d", coerced, 5)
    assert record.options.detect is False and record.options.max_events == 3


def test_the_cache_salt_reads_coerced_options_too():
    from types import SimpleNamespace

    from sinkguard.engines.vllm.cache_salt import salt_request

    policies = PolicySet.model_validate({"policies": [{"name": "remove", "interventions": [
        {"kind": "mlp_projection_removal"}]}]})
    request = SimpleNamespace(cache_salt=None, sampling_params=SimpleNamespace(
        extra_args={"sinkguard_detect": 0, "sinkguard_policy": "remove"}))
    salt_request(request, policies)
    assert request.cache_salt is not None and request.cache_salt.startswith("sinkguard:policy-")
