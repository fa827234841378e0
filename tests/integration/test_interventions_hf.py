"""MLP interventions in the transformers engine on the real embedded model (float32)."""

from __future__ import annotations

import numpy as np

from sinkguard.core.interventions import MlpNormClamp, MlpProjectionRemoval
from sinkguard.core.plan import RequestSlice, build_plan
from sinkguard.engines.hf.interventions import intervening
from sinkguard.policy import Policy


def prompt_with_sinks(hf_model, default_scan) -> list[int]:
    best = max(default_scan.prompts, key=lambda p: sum(e.kind == "secondary" for e in p.detection.events))
    return best.token_ids


def test_projection_removal_fires_on_forming_tokens_and_removes_the_component(hf_model, default_scan, profile):
    tokens = prompt_with_sinks(hf_model, default_scan)
    forming = [f.layer for f in profile.meta.forming_layers]
    policy = Policy(name="remove", interventions=[MlpProjectionRemoval(alpha=1.0)])
    reference = profile.reference_hidden_tensor()
    with intervening(hf_model, policy, len(tokens), profile) as state:
        trace = hf_model.trace(tokens, reference_directions=reference / reference.norm(dim=-1, keepdim=True))
    assert state.applied, "the formation signal should fire on a prompt with secondary sinks"
    for edit in state.applied:
        assert edit.layer in forming and 0 not in edit.positions
        # the edited tokens' MLP output has no component left along the sink direction
        assert np.abs(trace.mlp_cos[0][edit.layer, edit.positions]).max() < 1e-4
    plain = hf_model.trace(tokens, reference_directions=reference / reference.norm(dim=-1, keepdim=True))
    edited_positions = {int(p) for e in state.applied for p in e.positions}
    untouched = [p for p in range(len(tokens)) if p not in edited_positions]
    first = min(e.layer for e in state.applied)
    # below the first edited layer nothing changes; untouched tokens at that layer are identical
    assert np.array_equal(plain.hidden_norm[:first], trace.hidden_norm[:first])
    assert np.allclose(plain.mlp_norm[first, untouched], trace.mlp_norm[first, untouched], rtol=1e-5)


def test_policy_without_interventions_changes_nothing(hf_model, default_scan, profile):
    tokens = prompt_with_sinks(hf_model, default_scan)
    with intervening(hf_model, Policy(name="none"), len(tokens), profile) as state:
        trace = hf_model.trace(tokens)
    assert state.applied == [] and np.array_equal(trace.hidden_norm, hf_model.trace(tokens).hidden_norm)


def test_plan_respects_phases_and_the_primary_sink():
    policy = Policy(name="p", interventions=[
        MlpNormClamp(relative_norm=1.0, phases=["decode"], layers=[2]),
        MlpProjectionRemoval(alpha=0.5, tokens="all_non_primary", layers=[3], phases=["prefill"]),
    ])
    pieces = [RequestSlice(0, 0, 4, 0, 3, policy), RequestSlice(1, 4, 5, 9, 6, policy),
              RequestSlice(2, 5, 7, 0, 2, Policy(name="none"))]
    plan = build_plan(pieces, forming_layers=[5])
    assert sorted(plan.mlp) == [2, 3]
    decode = plan.mlp[2][0]  # decode tokens: request 0's position 3 and request 1's position 9
    assert decode.rows.tolist() == [3, 4] and decode.flagged_only and decode.requests.tolist() == [0, 1]
    prefill = plan.mlp[3][0]  # prefill tokens but never position 0
    assert prefill.rows.tolist() == [1, 2] and not prefill.flagged_only
    flagged = build_plan([RequestSlice(0, 0, 4, 0, 4, Policy(name="f", interventions=[MlpProjectionRemoval()]))],
                         forming_layers=[1])
    assert flagged.mlp[1][0].rows.tolist() == [1, 2, 3]  # the primary sink is never a candidate
    assert build_plan([pieces[2]], forming_layers=[5]).empty


