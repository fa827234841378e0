"""The engine-independent online detector on synthetic activations with the real profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkguard.core.online import RequestTracker, StepDetector


def planted_step(profile, tokens: int = 6, seed: int = 0):
    """Random activations; token 3 aligned with the reference in layers 2..8 (a secondary sink)."""
    generator = torch.Generator().manual_seed(seed)
    layers, dim = profile.model.num_layers, profile.model.hidden_size
    residual = torch.randn(layers, tokens, dim, generator=generator)
    mlp = torch.randn(layers, tokens, dim, generator=generator)
    reference = profile.reference_hidden_tensor()
    for layer in range(2, 9):
        residual[layer, 3] = 40 * reference[layer] - mlp[layer, 3]
    mlp[2, 3] = 60 * reference[2]  # the forming MLP writes a large aligned vector
    residual[2, 3] = 0.0
    return residual, mlp


@pytest.mark.parametrize("buffer_tokens", [0, 256])
def test_step_detector_finds_planted_sink(profile, buffer_tokens):
    residual, mlp = planted_step(profile)
    detector = StepDetector(profile, buffer_tokens=buffer_tokens)
    detector.start(residual.shape[1])
    for layer in range(profile.model.num_layers):
        detector.observe(layer, mlp[layer], residual[layer])
    events = detector.finish(np.arange(100, 106))
    assert [(c, e.position, e.birth_layer, e.lifetime, e.kind, e.forming_layer) for c, e in events] == [
        (3, 103, 2, 7, "secondary", 2)]
    assert events[0][1].mlp_cos == pytest.approx(1.0, abs=1e-5)


def test_buffered_and_per_layer_paths_agree(profile):
    residual, mlp = planted_step(profile, tokens=40, seed=1)
    results = []
    for buffer_tokens in (0, 256):
        detector = StepDetector(profile, buffer_tokens=buffer_tokens)
        detector.start(40)
        for layer in range(profile.model.num_layers):
            detector.observe(layer, mlp[layer], residual[layer])
        results.append(detector._statistics())
    for name in results[0]:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-5)


def test_incomplete_step_reports_nothing(profile):
    detector = StepDetector(profile)
    residual, mlp = planted_step(profile)
    detector.start(6)
    detector.observe(0, mlp[0], residual[0])
    assert detector.finish(np.arange(6)) == []


def test_tracker_is_bounded_and_retires_finished_requests():
    tracker = RequestTracker(max_finished=2)
    for request in ("a-1", "b-1", "c-1"):
        tracker.get(request, {"sinkguard_max_events": 3}, prompt_tokens=5)
    tracker.retire_missing({"c-1"})
    assert set(tracker.live) == {"c-1"} and set(tracker.finished) == {"a-1", "b-1"}
    tracker.retire_missing(set())
    assert set(tracker.finished) == {"b-1", "c-1"}  # oldest dropped
    assert tracker.lookup("c")[0]["request_id"] == "c-1" and tracker.lookup("a") == []
    # an invalid option never fails the worker: defaults apply
    assert tracker.get("d-1", {"sinkguard_max_events": "x"}, 1).options.max_events == 256
