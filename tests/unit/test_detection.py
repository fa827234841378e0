"""The detector's rules on hand-made traces: windows, runs, lifetimes, kinds, formation."""

from __future__ import annotations

import numpy as np
import pytest

from sinkguard.core.detection import (
    active_window,
    attribute_formation,
    choose_reference,
    detect_in_trace,
    detect_sinks,
    flagged_run,
)
from sinkguard.core.settings import DetectorConfig, LifetimeRule


def test_lifetime_rule_relative_default_scales_with_depth():
    rule = LifetimeRule()
    assert rule.thresholds(30) == (15, 3)
    assert rule.thresholds(18) == (9, 1)
    assert rule.thresholds(64) == (32, 6)
    assert rule.classify(7, 30) == "secondary"
    assert rule.classify(3, 30) == "noise"
    assert rule.classify(15, 30) == "primary"


def test_lifetime_rule_paper_preset_matches_paper_code():
    rule = LifetimeRule(preset="paper")
    assert rule.thresholds(48) == (33, 4)
    assert [rule.classify(x, 48) for x in (4, 5, 32, 33)] == ["noise", "secondary", "secondary", "primary"]


def test_run_steps_over_layers_outside_window_and_stops_at_unflagged_window_layer():
    window = np.array([1, 1, 1, 0, 0, 1, 1, 1], dtype=bool)
    column = np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    birth, last, layers = flagged_run(column, window)
    assert (birth, last, layers) == (1, 5, [1, 2, 5])
    assert flagged_run(np.zeros(8, dtype=bool), window) is None


def test_norm_ratio_window_and_paper_window():
    ratio = np.array([2.3, 5.3, 10.7, 9.8, 1.1, 1.3, 179.0, 170.0, 15.0, 1.0])
    norms = ratio * 10
    assert active_window(ratio, norms, DetectorConfig()).tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 1, 0]
    paper = active_window(ratio, norms, DetectorConfig(window_rule="paper"))
    # the largest jump (1.3 -> 179) starts the window at layer 6; the largest later drop in absolute
    # norm (170 -> 15, between layers 7 and 8) ends it at the layer after the drop, 8
    assert np.flatnonzero(paper).tolist() == [6, 7, 8]


def test_choose_reference_picks_largest_mean_norm_among_candidates():
    norms = np.ones((4, 10))
    norms[:, 1] = 50
    norms[:, 5] = 100  # not a candidate
    assert choose_reference(norms, 3) == 1


def test_detect_sinks_kinds_and_anti_aligned_tokens_count():
    config = DetectorConfig()
    layers, tokens = 20, 6
    cos = np.zeros((layers, tokens))
    cos[:, 0] = 1.0  # reference: everywhere
    cos[3:10, 2] = -0.95  # anti-aligned, 7 layers -> secondary
    cos[5:6, 4] = 0.99  # one layer -> noise
    window = np.ones(layers, dtype=bool)
    events = {e.position: e for e in detect_sinks(np.abs(cos) > config.cos_threshold, window, config)}
    assert set(events) == {0, 2, 4}
    assert events[0].kind == "primary" and events[0].lifetime == 20
    assert (events[2].kind, events[2].birth_layer, events[2].lifetime) == ("secondary", 3, 7)
    assert events[4].kind == "noise"


def test_formation_picks_largest_relative_mlp_output_in_lookback():
    events = detect_sinks(np.array([[0], [0], [1], [1]], dtype=bool), np.ones(4, dtype=bool), DetectorConfig())
    mlp_norm = np.array([[1.0], [5.0], [40.0], [1.0]])
    mlp_cos = np.array([[0.1], [0.5], [0.98], [0.2]])
    attribute_formation(events, mlp_norm, mlp_cos, np.ones(4), lookback=1)
    assert events[0].forming_layer == 2
    assert events[0].mlp_norm_ratio == pytest.approx(40.0)
    assert events[0].mlp_cos == pytest.approx(0.98)


def test_no_outlier_reference_means_no_window_and_no_sinks():
    rng = np.random.default_rng(0)
    norms = rng.uniform(0.9, 1.1, size=(6, 50))
    cos = rng.uniform(-0.5, 0.5, size=(1, 6, 50))
    cos[0, :, 0] = 1.0
    detection = detect_in_trace(norms, cos, norms, cos, DetectorConfig())
    assert detection.window_layers == []
    assert detection.events == []
