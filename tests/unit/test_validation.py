"""Attention-confirmed sinks, agreement counting and the detector search, on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

from sinkguard.core.attention import uniform_share
from sinkguard.core.confirmation import agreement, confirmed_sinks, longest_run
from sinkguard.core.detection import SinkEvent
from sinkguard.core.detector_search import TraceArrays, search_detector
from sinkguard.core.settings import ConfirmationConfig, DetectorConfig

LAYERS, TOKENS, HEADS = 12, 160, 2


def scores_with_sinks(sinks: dict[int, tuple[float, range]]) -> np.ndarray:
    """``[L, H, T]`` head scores at the uniform share, with ``position: (times uniform, layers)``."""
    share = uniform_share(TOKENS).numpy()
    scores = np.tile(share, (LAYERS, HEADS, 1)).astype(float)
    for position, (times, layers) in sinks.items():
        scores[list(layers), :, position] = times * share[position]
    return scores


def event(position: int, kind: str = "secondary") -> SinkEvent:
    return SinkEvent(position=position, birth_layer=2, lifetime=6, last_layer=7, kind=kind,
                     flagged_layers=list(range(2, 8)))


def test_longest_run_counts_consecutive_layers_only():
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=bool)
    assert longest_run(mask).tolist() == [2, 3, 0]


def test_confirmed_sinks_strong_weak_and_judged_range():
    config = ConfirmationConfig()
    scores = scores_with_sinks({
        0: (50.0, range(LAYERS)),  # the reference: never a secondary sink
        20: (12.0, range(2, 9)),  # strong: 12x for 7 layers
        40: (12.0, range(2, 6)),  # only 4 layers: weak, not strong
        60: (4.0, range(3, 7)),  # weak
        70: (2.5, range(LAYERS)),  # below the weak ratio
        150: (40.0, range(LAYERS)),  # too few queries see it (T - 150 = 10 < 64)
    })
    confirmed = confirmed_sinks(scores, None, config, reference=0)
    assert confirmed.strong.tolist() == [20]
    assert confirmed.weak.tolist() == [20, 40, 60]
    assert confirmed.judged_until == TOKENS - config.min_queries + 1


def test_sliding_window_layers_judge_against_their_own_uniform_share():
    window = 16
    scores = scores_with_sinks({30: (11.0, range(2, 9))})  # 11x the *full-causal* uniform share
    config = ConfirmationConfig(min_queries=16)
    assert confirmed_sinks(scores, None, config, reference=0).strong.tolist() == [30]
    # a query of a window-16 layer sees at most 16 keys, so its even share is far larger: the same
    # scores are no sink there
    assert confirmed_sinks(scores, [window] * LAYERS, config, reference=0).strong.tolist() == []


def test_agreement_recall_unexplained_and_match_distance():
    config = ConfirmationConfig()
    scores = scores_with_sinks({20: (12.0, range(2, 9)), 50: (12.0, range(2, 9)), 60: (4.0, range(3, 7))})
    confirmed = confirmed_sinks(scores, None, config)
    events = [event(21), event(60), event(80), event(90, "noise"), event(0, "primary")]
    events[-1].is_reference = True
    result = agreement(events, confirmed, config)
    assert result.strong == 2 and result.strong_found == 1  # 21 is within one of 20; 50 missed
    assert result.recall == pytest.approx(0.5)
    assert result.flags == {"secondary": 3, "primary": 0, "noise": 1}
    assert result.unexplained == {"secondary": 1, "primary": 0, "noise": 1}  # 80 and 90 match nothing
    assert result.unexplained_per_256 == pytest.approx(256 / result.tokens_judged)
    assert not result.meets(config)


def synthetic_prompt(rng: np.random.Generator, sink_positions: list[int]) -> TraceArrays:
    """Every token aligned with the reference (as on Gemma 3); only sinks also have a large norm."""
    hidden_norm = rng.uniform(0.9, 1.1, (LAYERS, TOKENS))
    hidden_norm[:, 0] = 20.0
    hidden_cos = np.clip(rng.normal(0.96, 0.02, (1, LAYERS, TOKENS)), -1, 1)
    mlp_norm = rng.uniform(0.9, 1.1, (LAYERS, TOKENS))
    mlp_cos = rng.normal(0.0, 0.3, (1, LAYERS, TOKENS))
    for position in sink_positions:
        hidden_norm[2:9, position] = 8.0
        mlp_norm[1, position] = 30.0
    hidden_cos[0, :, 0] = 1.0
    scores = scores_with_sinks({p: (15.0, range(3, 10)) for p in sink_positions})
    return TraceArrays(hidden_norm, hidden_cos, mlp_norm, mlp_cos, confirmed_sinks(scores, None, ConfirmationConfig()))


def test_search_finds_the_norm_condition_when_alignment_alone_flags_everything():
    rng = np.random.default_rng(0)
    prompts = [synthetic_prompt(rng, [10 + i, 50 + 2 * i]) for i in range(6)]
    result = search_detector(prompts, DetectorConfig(), ConfirmationConfig())
    assert result.status == "validated"
    assert result.chosen.agreement.recall == 1.0
    assert result.chosen.agreement.unexplained_per_256 == 0.0
    assert result.chosen.config.min_norm_ratio > 0 or result.chosen.config.min_formation_ratio > 0
    paper = next(c for c in result.tried if c.config.cos_threshold == 0.9 and c.config.min_norm_ratio == 0
                 and c.config.min_formation_ratio == 0)
    assert paper.agreement.unexplained_per_256 > 50  # the paper's test alone flags nearly every token


def test_search_reports_a_model_without_secondary_sinks():
    rng = np.random.default_rng(1)
    prompts = [synthetic_prompt(rng, []) for _ in range(4)]
    result = search_detector(prompts, DetectorConfig(), ConfirmationConfig())
    assert result.status == "no_secondary_sinks"
    assert result.chosen.agreement.flags["secondary"] == 0


def test_search_says_below_target_when_nothing_separates_sinks():
    rng = np.random.default_rng(2)
    prompts = []
    for i in range(4):
        prompt = synthetic_prompt(rng, [20 + i])
        # the attention sink looks exactly like every other token in the hidden states
        prompt.hidden_norm[:, 20 + i] = 1.0
        prompt.mlp_norm[:, 20 + i] = 1.0
        prompts.append(prompt)
    result = search_detector(prompts, DetectorConfig(), ConfirmationConfig())
    assert result.status == "below_target"
    assert "no detector setting reached" in result.message
