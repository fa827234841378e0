"""Interventions in the transformers engine on the real embedded model (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkguard.engines.hf.interventions import HFIntervention, intervening
from sinkguard.engines.hf.likelihood import mean_loglik
from sinkguard.interventions.attention_edits import kept_fraction
from sinkguard.interventions.plan import RequestSlice, build_plan
from sinkguard.interventions.policy import Policy
from sinkguard.interventions.specs import AttentionRedistribution, FirstTokenScaling, MlpNormClamp, MlpProjectionRemoval
from sinkguard.offline.selection import select_heads


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




def explicit_redistribution(query, key, value, targets, kept, scale):
    """Float64 brute force from explicit attention weights: each visible target keeps ``kept`` of its
    weight, the other keys share the removed mass in proportion to their weights."""
    q, k, v = query.double(), key.double(), value.double()  # [H, Q, D], [Hkv, K, D]
    group = q.shape[0] // k.shape[0]
    num_q, num_k = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(q.shape[0]):
        for i in range(num_q):
            seen = num_k - num_q + i + 1
            probs = torch.softmax(q[h, i] @ k[h // group, :seen].T * scale, dim=-1)
            hit = targets[:seen]
            mass = probs[hit].sum()
            if hit.any() and not hit.all():
                probs = torch.where(hit, kept * probs, probs * (1 - kept * mass) / (1 - mass))
            out[h, i] = probs @ v[h // group, :seen]
    return out


@pytest.mark.parametrize("spec", [AttentionRedistribution(beta=0.25, layers=[4, 9], heads=[0, 3, 7]),
                                  FirstTokenScaling(gamma=0.4, layers=[2, 6], heads=[1, 8])], ids=lambda s: s.kind)
def test_attention_edits_equal_explicit_weights_in_float64(hf_model, default_scan, profile, spec):
    """The edited heads equal a float64 brute force (<= 1e-5) in prefill and in a decode step with a
    KV cache; the other heads are exactly the model's own attention."""
    tokens = prompt_with_sinks(hf_model, default_scan)
    captured = []
    original = HFIntervention.attend

    def capturing(self, layer, query, key, value, output, scale, window):
        result = original(self, layer, query, key, value, output, scale, window)
        captured.append((layer, query[0].clone(), key[0].clone(), value[0].clone(), output[0].clone(), result[0],
                         scale))
        return result

    policy = Policy(name="p", interventions=[spec])
    HFIntervention.attend = capturing
    try:
        with intervening(hf_model, policy, len(tokens) - 1, profile) as state, torch.no_grad():
            out = hf_model.model(input_ids=torch.tensor([tokens[:-1]]), use_cache=True)
            hf_model.model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    finally:
        HFIntervention.attend = original
    assert len(captured) == 2 * len(spec.layers)  # every edited layer, prefill and decode
    worst = 0.0
    for layer, query, key, value, plain, edited, scale in captured:
        if isinstance(spec, FirstTokenScaling):
            targets = torch.zeros(key.shape[1], dtype=torch.bool)
            targets[0] = True
        else:
            positions = state.memory.targets(0, layer)
            assert positions.size > 0, "the formation signal should flag sinks below the edited layers"
            targets = torch.zeros(key.shape[1], dtype=torch.bool)
            targets[torch.from_numpy(positions)] = True
        expected = explicit_redistribution(query, key, value, targets, kept_fraction(spec), scale)  # [H, Q, D]
        heads = spec.heads
        others = [h for h in range(query.shape[0]) if h not in heads]
        worst = max(worst, float((edited[:, heads].double() - expected[heads].transpose(0, 1)).abs().max()))
        assert torch.equal(edited[:, others], plain[:, others])
        assert not torch.allclose(edited[:, heads], plain[:, heads], atol=1e-4)  # the edit did something
    assert worst <= 1e-5, worst


def test_head_selection_keeps_only_heads_that_improve_the_objective(hf_model, default_scan, profile):
    prompts = [p.token_ids[:96] for p in default_scan.prompts[:3]]
    calibration, held_out = prompts[:2], prompts[2:]
    selection = select_heads(hf_model, profile, calibration, AttentionRedistribution(beta=0.0), layers=[3, 10],
                             held_out=held_out, progress=False)
    assert len(selection.candidates) == 2 * profile.model.num_heads
    assert selection.selected >= selection.baseline
    assert all(c.gain > 1e-4 for c in selection.kept)
    policy = selection.policy("act")
    kept = {(c.layer, c.head) for c in selection.kept}
    assert {(spec.layers[0], h) for spec in policy.interventions for h in spec.heads} == kept
    # the stored selection reproduces the objective it was chosen on
    if kept:
        assert mean_loglik(hf_model, calibration, policy, profile) == pytest.approx(selection.selected, abs=1e-9)
    assert selection.held_out_selected is not None


def test_scan_with_a_policy_reports_the_mass_it_moved(hf_model, default_scan, profile):
    from sinkguard.core.settings import ScanConfig
    from sinkguard.offline.effects import policy_effect
    from sinkguard.offline.scanner import scan
    from sinkguard.sources.prompts import Prompt

    prompts = [Prompt(token_ids=tuple(p.token_ids)) for p in default_scan.prompts[:3]]
    policy = Policy(name="act", interventions=[AttentionRedistribution(beta=0.0, layers=[5])])
    before = scan(hf_model, prompts, ScanConfig(), profile=profile, progress=False)
    after = scan(hf_model, prompts, ScanConfig(), profile=profile, progress=False, policy=policy)
    effect = policy_effect(before, after, policy, hf_model, profile, held_out=[list(p.token_ids) for p in prompts])
    assert effect.secondary_sinks > 0
    assert effect.mass_after[:5] == effect.mass_before[:5]  # below the edited layer nothing changes
    assert effect.mass_after[5] < 0.5 * effect.mass_before[5]
    assert effect.perplexity_after != effect.perplexity_before
