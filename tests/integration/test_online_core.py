"""The engine-independent online detector on synthetic activations with the real profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkguard.core.online import StepDetector
from sinkguard.serving.records import RequestTracker


def planted_step(profile, tokens: int = 6, seed: int = 0):
    """Activations at the profile's median token scale; token 3 is a secondary sink: aligned with the
    reference and 10x the median norm in layers 2..8, formed by a 40x aligned layer-2 MLP output."""
    generator = torch.Generator().manual_seed(seed)
    layers, dim = profile.model.num_layers, profile.model.hidden_size
    hidden_scale = torch.from_numpy(profile.median_hidden_norm)[:, None, None] / dim**0.5
    mlp_scale = torch.from_numpy(profile.median_mlp_norm)[:, None, None] / dim**0.5
    residual = torch.randn(layers, tokens, dim, generator=generator) * hidden_scale
    mlp = torch.randn(layers, tokens, dim, generator=generator) * mlp_scale
    reference = profile.reference_hidden_tensor()
    for layer in range(2, 9):
        residual[layer, 3] = 10 * float(profile.median_hidden_norm[layer]) * reference[layer] - mlp[layer, 3]
    mlp[2, 3] = 40 * float(profile.median_mlp_norm[2]) * reference[2]  # the forming MLP writes a large aligned vector
    residual[2, 3] = 10 * float(profile.median_hidden_norm[2]) * reference[2] - mlp[2, 3]
    return residual, mlp


@pytest.mark.parametrize("buffer_tokens,chunk_tokens", [(0, 2048), (0, 4), (256, 2048)])
def test_step_detector_finds_planted_sink(profile, buffer_tokens, chunk_tokens):
    residual, mlp = planted_step(profile)
    detector = StepDetector(profile, buffer_tokens=buffer_tokens, chunk_tokens=chunk_tokens)
    events = run_step(detector, residual, mlp, np.arange(100, 106))
    assert [(c, e.position, e.birth_layer, e.lifetime, e.kind, e.forming_layer) for c, e in events] == [
        (3, 103, 2, 7, "secondary", 2)]
    assert events[0][1].mlp_cos == pytest.approx(1.0, abs=1e-5)


def feed(detector, residual, mlp) -> None:
    detector.start(residual.shape[1])
    for layer in range(residual.shape[0]):
        detector.observe(layer, mlp[layer], residual[layer])


def run_step(detector, residual, mlp, positions=None):
    feed(detector, residual, mlp)
    return detector.finish(np.arange(residual.shape[1]) if positions is None else positions)


def capture_statistics(detector, residual, mlp):
    feed(detector, residual, mlp)
    return detector._statistics()


def test_capture_modes_agree(profile):
    """Per-layer reduction, copying, verified zero-copy and a verification step give the same numbers."""
    residual, mlp = planted_step(profile, tokens=40, seed=1)
    per_layer = StepDetector(profile, buffer_tokens=0)
    copying = StepDetector(profile)
    copying.zero_copy = False
    verifying = StepDetector(profile, verify_steps=1)
    zero_copy = StepDetector(profile, verify_steps=0)
    results = [capture_statistics(d, residual, mlp) for d in (per_layer, copying, verifying, zero_copy)]
    assert verifying.zero_copy and verifying.verify_steps == 0  # verified, not demoted
    for other in results[1:]:
        for name in results[0]:
            np.testing.assert_allclose(other[name], results[0][name], rtol=1e-5, atol=1e-5)


def test_in_place_overwrite_is_caught_by_verification(profile):
    """An engine that overwrites a layer's outputs after the layer returned (vLLM's GPU fused
    add+RMSNorm does) must not corrupt detection: the verification copy wins and zero-copy stops."""
    residual, mlp = planted_step(profile)
    detector = StepDetector(profile, verify_steps=4)
    detector.start(6)
    for layer in range(profile.model.num_layers):
        detector.observe(layer, mlp[layer], residual[layer])
        if layer > 0:  # the next layer's norm overwrites the previous layer's residual in place
            residual[layer - 1].mul_(-3.0)
    events = detector.finish(np.arange(6))
    assert not detector.zero_copy
    assert [(c, e.birth_layer, e.lifetime) for c, e in events] == [(3, 2, 7)]
    residual, mlp = planted_step(profile)
    assert [(c, e.birth_layer) for c, e in run_step(detector, residual, mlp)] == [(3, 2)]  # copy mode works


def test_shared_memory_during_verification_uses_the_copy(profile):
    residual, mlp = planted_step(profile)
    detector = StepDetector(profile, verify_steps=2)
    shared = torch.empty_like(residual[0])
    detector.start(6)
    for layer in range(profile.model.num_layers):
        shared.copy_(residual[layer])  # the engine writes every layer's residual into one buffer
        detector.observe(layer, mlp[layer], shared)
    events = detector.finish(np.arange(6))
    assert not detector.zero_copy and detector.unscanned_steps == 0
    assert [(c, e.birth_layer, e.lifetime) for c, e in events] == [(3, 2, 7)]


def test_shared_memory_after_verification_marks_the_step_unscanned(profile):
    residual, mlp = planted_step(profile)
    detector = StepDetector(profile, verify_steps=0)
    shared = residual[0].clone()
    detector.start(6)
    for layer in range(profile.model.num_layers):
        detector.observe(layer, mlp[layer], shared)  # every layer hands back the same storage
    assert detector.finish(np.arange(6)) is None
    assert detector.unscanned_steps == 1 and not detector.zero_copy
    assert [(c, e.birth_layer) for c, e in run_step(detector, residual, mlp)] == [(3, 2)]


def test_incomplete_step_reports_nothing(profile):
    detector = StepDetector(profile)
    residual, mlp = planted_step(profile)
    detector.start(6)
    detector.observe(0, mlp[0], residual[0])
    assert detector.finish(np.arange(6)) is None
    assert detector.unscanned_steps == 1


def test_tracker_is_bounded_and_retires_finished_requests():
    tracker = RequestTracker(max_finished=2)
    for request in ("a-1a2b3c4d", "b-1a2b3c4d", "c-1a2b3c4d"):
        tracker.get(request, {"sinkguard_max_events": 3}, prompt_tokens=5)
    tracker.retire_missing({"c-1a2b3c4d"})
    assert set(tracker.live) == {"c-1a2b3c4d"} and set(tracker.finished) == {"a-1a2b3c4d", "b-1a2b3c4d"}
    tracker.retire_missing(set())
    assert set(tracker.finished) == {"b-1a2b3c4d", "c-1a2b3c4d"}  # oldest dropped
    assert tracker.lookup("c")[0]["request_id"] == "c-1a2b3c4d" and tracker.lookup("a") == []
    # an invalid option never fails the worker: defaults apply
    assert tracker.get("d-1", {"sinkguard_max_events": "x"}, 1).options.max_events == 256


def test_zero_copy_capture_is_reverified_periodically(profile):
    """An engine that starts overwriting layer outputs in place long after start-up is caught."""
    residual, mlp = planted_step(profile)
    detector = StepDetector(profile, verify_steps=2, reverify_every=5)
    for _ in range(6):
        assert [(c, e.birth_layer) for c, e in run_step(detector, residual, mlp)] == [(3, 2)]
    assert detector.zero_copy and detector.verifications == 3  # steps 1, 2 and 5
    # from now on each layer's MLP output is overwritten after the layer returned (fused add+norm style)
    for small_step in range(7, 12):
        mlp_now = mlp.clone()
        detector.start(6)
        for layer in range(profile.model.num_layers):
            detector.observe(layer, mlp_now[layer], residual[layer])
        mlp_now.mul_(0.5)
        detector.finish(np.arange(6))
        if not detector.zero_copy:
            break
    assert not detector.zero_copy and small_step == 10  # the next periodic check saw it


def test_detector_buffer_is_allocated_up_front(profile):
    detector = StepDetector(profile)
    assert detector.buffer_bytes == 0
    size = detector.allocate("cpu")
    assert size == profile.model.num_layers * 256 * 2 * profile.model.hidden_size * 4 == detector.buffer_bytes
