"""Intervention specs and policies: typed, ranges checked, unknown keys and kinds rejected by name."""

from __future__ import annotations

import pytest
import torch

from sinkguard.errors import ConfigError
from sinkguard.interventions.policy import Policy, PolicySet, load_policies
from sinkguard.interventions.specs import FirstTokenScaling, MlpNormClamp, MlpProjectionRemoval, formation_rows

POLICIES = """
default: act
policies:
  - name: act
    interventions:
      - {kind: attention_redistribution, beta: 0.2, layers: [3, 4], heads: [0, 5]}
  - name: clamp
    interventions:
      - {kind: mlp_norm_clamp, relative_norm: 3.0, phases: [prefill]}
      - {kind: mlp_projection_removal, alpha: 0.5}
"""


def test_policy_file_loads_with_typed_interventions(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text(POLICIES)
    policies = load_policies(path)
    assert policies.default == "act" and policies.names == ["act", "clamp"]
    clamp = policies.get("clamp")
    assert isinstance(clamp.interventions[0], MlpNormClamp) and clamp.interventions[0].phases == ["prefill"]
    assert isinstance(clamp.interventions[1], MlpProjectionRemoval) and clamp.interventions[1].alpha == 0.5
    assert policies.get("none").interventions == []
    with pytest.raises(ConfigError, match="unknown policy 'other'"):
        policies.get("other")


@pytest.mark.parametrize("bad,field", [
    ("{kind: attention_redistribution, beta: 1.5}", "beta"),
    ("{kind: mlp_norm_clamp}", "exactly one of target_norm and relative_norm"),
    ("{kind: mlp_projection_removal, alpah: 0.5}", "alpah"),
    ("{kind: sink_eraser}", "unknown intervention kind 'sink_eraser'"),
    ("{kind: first_token_scaling, layers: [-1]}", "layers"),
])
def test_invalid_policy_names_the_field(tmp_path, bad, field):
    path = tmp_path / "p.yaml"
    path.write_text(f"policies:\n  - name: p\n    interventions:\n      - {bad}\n")
    with pytest.raises(ConfigError, match=field):
        load_policies(path)


def test_default_must_exist_and_names_be_unique():
    with pytest.raises(ConfigError, match="default policy 'x'"):
        from sinkguard.core.settings import validate_config

        validate_config(PolicySet, {"default": "x"})
    with pytest.raises(ConfigError, match="unique"):
        validate_config(PolicySet, {"policies": [{"name": "a"}, {"name": "a"}]})


def test_mlp_arithmetic():
    torch.manual_seed(0)
    direction = torch.randn(16)
    unit = direction / direction.norm()
    rows = torch.randn(5, 16) + 20 * unit
    removed = MlpProjectionRemoval(alpha=1.0).apply(rows, direction, 1.0)
    assert torch.allclose(removed @ unit, torch.zeros(5), atol=1e-5)
    half = MlpProjectionRemoval(alpha=0.5).apply(rows, direction, 1.0)
    assert torch.allclose(half @ unit, 0.5 * (rows @ unit), atol=1e-5)
    clamped = MlpNormClamp(relative_norm=2.0).apply(rows, direction, 3.0)
    assert torch.allclose(clamped.norm(dim=-1), torch.full((5,), 6.0)) and torch.allclose(
        clamped / clamped.norm(dim=-1, keepdim=True), rows / rows.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.equal(MlpNormClamp(target_norm=0.0).apply(rows, direction, 1.0), torch.zeros(5, 16))
    mixed = torch.cat([rows[:2], torch.randn(3, 16)])
    assert formation_rows(mixed, direction, median_norm=4.0, min_ratio=3.0, cos_threshold=0.9).tolist() == [
        True, True, False, False, False]


def test_layers_and_heads_the_model_does_not_have_are_refused_by_name(tmp_path):
    from sinkguard.interventions.policy import ModelScope, check_scope

    path = tmp_path / "p.yaml"
    path.write_text("policies:\n  - name: act\n    interventions:\n"
                    "      - {kind: attention_redistribution, layers: [3], heads: [0, 9]}\n")
    policies = load_policies(path).policies
    check_scope(policies, ModelScope(30, 10, (2,)))
    with pytest.raises(ConfigError, match=r"'act': attention_redistribution names heads \[9\] \(the model has 9"):
        check_scope(policies, ModelScope(30, 9, (2,)))
    with pytest.raises(ConfigError, match=r"names layers \[3\] \(the model has 3\)"):
        check_scope(policies, ModelScope(3, 9, (2,)))
    # a model whose profile saw no secondary sinks form: ACT would never act; ZeroTuning still can
    with pytest.raises(ConfigError, match="found none forming"):
        check_scope(policies, ModelScope(30, 10, ()))
    check_scope([Policy(name="z", interventions=[FirstTokenScaling(gamma=0.5)])], ModelScope(30, 10, ()))


def test_a_request_resolves_to_a_named_inline_or_default_policy():
    import json as _json

    from sinkguard.interventions.policy import ModelScope, PolicySet
    from sinkguard.serving.options import RequestOptions

    act = {"name": "act", "interventions": [{"kind": "attention_redistribution", "beta": 0.0, "layers": [4]}]}
    closed = PolicySet.model_validate({"default": "act", "policies": [act]})
    opened = closed.model_copy(update={"allow_inline": True})
    scope = ModelScope(30, 9, (2,))
    assert RequestOptions().resolved_policy(closed, scope).name == "act"  # the server's default
    assert RequestOptions(policy="none").resolved_policy(closed, scope).interventions == []
    inline = RequestOptions(inline_policy=_json.dumps({"interventions": [{"kind": "mlp_norm_clamp",
                                                                          "relative_norm": 2.0}]}))
    with pytest.raises(ConfigError, match="inline policies are disabled"):
        inline.resolved_policy(closed, scope)
    resolved = inline.resolved_policy(opened, scope)
    assert resolved.name == "inline" and resolved.interventions[0].relative_norm == 2.0
    for bad, message in (("[1]", "expected a JSON object"), ("{nope", "Expecting property name"),
                         ('{"interventions": [{"kind": "mlp_norm_clamp"}]}', "exactly one of target_norm"),
                         ('{"interventions": [{"kind": "first_token_scaling", "heads": [12]}]}', r"heads \[12\]")):
        with pytest.raises(ConfigError, match=message):
            RequestOptions(inline_policy=bad).resolved_policy(opened, scope)
    with pytest.raises(ConfigError, match="not both"):
        RequestOptions.from_extra_args({"sinkguard_policy": "act", "sinkguard_inline_policy": "{}"})
    with pytest.raises(ValueError, match="neither 'none' nor 'inline'"):
        PolicySet.model_validate({"policies": [{"name": "inline"}]})
