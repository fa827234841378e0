"""The scanner on the real embedded model (SmolLM2-135M-Instruct): what science.md measured."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from sinkguard.core.settings import AttentionConfig, DetectorConfig, ScanConfig
from sinkguard.offline.scanner import scan, scan_prompt


def secondary_events(result):
    return [(p, e) for p in result.prompts for e in p.as_result.secondary]


def test_reference_is_the_first_token_and_a_primary_sink(default_scan):
    for prompt in default_scan.prompts:
        assert prompt.detection.reference == 0
        reference = next(e for e in prompt.detection.events if e.is_reference)
        assert reference.kind == "primary"
        assert reference.lifetime >= 25


def test_secondary_sinks_on_ordinary_tokens_born_early_middle(default_scan):
    events = secondary_events(default_scan)
    assert len(events) >= 8, "several secondary sinks expected in 8 x 256 tokens of English"
    births = Counter(e.birth_layer for _, e in events)
    layers = default_scan.model.num_layers
    assert all(1 <= b <= layers // 3 for b in births), births
    tokens = Counter(p.tokens[e.position] for p, e in events)
    assert tokens[" the"] >= 3, tokens
    assert all(e.position != 0 for _, e in events)
    # the usual level: born at layer 2, flagged through layer 8
    assert Counter((e.birth_layer, e.lifetime) for _, e in events).most_common(1)[0][0] == (2, 7)


def test_secondary_sinks_are_formed_by_one_mlp_layer(default_scan):
    events = [e for _, e in secondary_events(default_scan)]
    forming = Counter(e.forming_layer for e in events)
    layer, count = forming.most_common(1)[0]
    assert layer == 2 and count >= 0.7 * len(events), forming
    strong = [e for e in events if e.forming_layer == 2]
    assert np.median([e.mlp_norm_ratio for e in strong]) > 10
    assert np.median([e.mlp_cos for e in strong]) > 0.95


def test_secondary_sinks_draw_attention_while_the_primary_is_weak(default_scan):
    summary = default_scan.summary
    primary = np.asarray(summary.primary_score_by_layer, dtype=float)
    secondary = np.asarray(summary.secondary_score_by_layer, dtype=float)
    middle = slice(3, 10)
    late = slice(12, 30)
    assert np.nanmean(primary[middle]) < 0.5 * np.nanmean(primary[late])
    assert np.nanmean(secondary[middle]) > 0.08
    assert np.nanmean(secondary[late]) < 0.02  # the sinks have ended
    strongest = max((e.peak_sink_score or 0) for _, e in secondary_events(default_scan))
    assert strongest > 0.2


def test_attention_scores_match_brute_force_full_attention(hf_model):
    from transformers import AutoModelForCausalLM

    text = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun. " * 6
    ids = hf_model.tokenize(text)
    config = ScanConfig(attention=AttentionConfig(query_chunk=32, min_votes=4))  # several chunks
    result = scan_prompt(hf_model, ids, config)
    eager = AutoModelForCausalLM.from_pretrained(hf_model.source.path, attn_implementation="eager")
    with torch.inference_mode():
        out = eager.model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    length = len(ids)
    votes = torch.arange(length, 0, -1, dtype=torch.float32)
    brute = torch.stack([a[0].sum(dim=1) / votes for a in out.attentions]).numpy()  # [L, H, T]
    ours = result.trace.head_scores
    assert np.isnan(ours[:, :, length - 3 :]).all()  # fewer than 4 voting queries
    valid = ~np.isnan(ours)
    np.testing.assert_allclose(ours[valid], brute[valid], atol=2e-5)
    # and the hidden-state statistics match the full hidden states (transformers applies the final
    # norm to its last returned hidden state; sinkguard records the raw residual stream of every layer)
    hidden = torch.stack(out.hidden_states[1:-1])[:, 0]
    cos = torch.nn.functional.cosine_similarity(hidden, hidden[:, :1], dim=-1).numpy()
    np.testing.assert_allclose(result.trace.hidden_cos[0, :-1], cos, atol=1e-4)
    np.testing.assert_allclose(result.trace.hidden_norm[:-1], hidden.norm(dim=-1).numpy(), rtol=1e-4)


def test_paper_window_rule_misses_smollm2_secondary_sinks(hf_model, default_scan):
    prompt = default_scan.prompts[0]
    config = ScanConfig(detector=DetectorConfig(window_rule="paper"))
    literal = scan_prompt(hf_model, prompt.token_ids, config)
    assert literal.detection.window_layers[0] == 11
    assert not literal.as_result.secondary
    assert prompt.as_result.secondary  # the default rule finds them on the same prompt


def test_model_without_trained_sinks_reports_none(random_model_dir):
    result = scan(random_model_dir, ["A plain sentence about nothing in particular, with the usual words."],
                  progress=False)
    prompt = result.prompts[0]
    # the first token may stand out mildly in a layer or two, but no token is flagged anywhere
    assert len(prompt.detection.window_layers) <= 2
    assert prompt.detection.events == []
    assert result.summary.kinds["secondary"] == 0


def test_profile_reference_finds_the_same_sinks(hf_model, default_scan, profile, scan_config):
    """The stored reference direction stands in for each prompt's own first token: same detector,
    window and medians, only the reference differs."""
    from sinkguard.core.detection import detect_in_trace

    for prompt in default_scan.prompts[:3]:
        trace = prompt.trace
        own = detect_in_trace(trace.hidden_norm, trace.hidden_cos, trace.mlp_norm, trace.mlp_cos,
                              profile.meta.detector, reference=0, window=profile.window_mask(),
                              mlp_median=profile.median_mlp_norm, hidden_median=profile.median_hidden_norm)
        with_profile = scan_prompt(hf_model, prompt.token_ids, scan_config, profile=profile)
        own_keys = {(e.position, e.birth_layer, e.lifetime, e.kind) for e in own.events}
        stored = {(e.position, e.birth_layer, e.lifetime, e.kind) for e in with_profile.detection.events}
        assert own_keys == stored
        assert any(kind == "secondary" for *_, kind in stored)
