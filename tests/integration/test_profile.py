"""Sink profiles: round trip, validation, and refusal against other weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sinkguard.core.profile import PROFILE_SCHEMA_VERSION, SinkProfile
from sinkguard.errors import ProfileError


def test_profile_contents_on_embedded_model(profile, default_scan):
    assert profile.reference_position == 0
    assert 2 in {f.layer for f in profile.meta.forming_layers}
    assert set(range(2, 9)) <= set(profile.meta.window_layers)
    assert profile.meta.calibration["reference_consistency_min"] > 0.99  # BOS state is input independent
    assert profile.meta.sink_heads, "secondary sinks draw > 0.1 attention in some heads"
    assert all(3 <= layer <= 10 for layer, _ in profile.meta.sink_heads)
    norms = np.linalg.norm(profile.tensors["reference_hidden"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_profile_records_the_validated_detector(profile):
    validation = profile.meta.validation
    assert validation["status"] == "validated", validation["message"]
    chosen = validation["chosen"]
    assert chosen["recall"] >= 0.9 and chosen["unexplained_sink_flags_per_256_tokens"] <= 0.5
    assert validation["settings_tried"] >= 100
    assert validation["criteria"]["strong_ratio"] == 10.0
    # what is stored is what the online detector will run
    assert profile.meta.detector.cos_threshold == chosen["cos_threshold"]
    assert profile.meta.detector.min_norm_ratio == chosen["min_norm_ratio"]


def test_round_trip(tmp_path, profile):
    profile.save(tmp_path / "p")
    loaded = SinkProfile.load(tmp_path / "p")
    assert loaded.meta == profile.meta
    for name, tensor in profile.tensors.items():
        np.testing.assert_array_equal(loaded.tensors[name], tensor)
    assert not list((tmp_path / "p").glob("*.pkl")) and not list((tmp_path / "p").glob("*.bin"))


def test_refused_for_other_weights(profile, random_model_dir):
    from sinkguard.engines.hf.runner import HFSinkModel

    other = HFSinkModel.load(random_model_dir)
    with pytest.raises(ProfileError, match="does not match model"):
        profile.check_model(other.info)


def test_refused_for_same_shapes_other_weights(profile, hf_model):
    from dataclasses import replace

    tampered = replace(hf_model.info, fingerprint="0" * 64)
    with pytest.raises(ProfileError, match="weights differ"):
        profile.check_model(tampered)
    profile.check_model(hf_model.info)  # the right model passes


def test_corrupt_and_foreign_profiles(tmp_path, profile):
    folder = profile.save(tmp_path / "p")
    meta = json.loads((folder / "profile.json").read_text())
    meta["schema_version"] = 99
    (folder / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="schema version 99"):
        SinkProfile.load(folder)
    meta["schema_version"] = 1  # a profile written before attention-validated calibration
    (folder / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match=r"version 1; .*Recalibrate: `sinkguard calibrate"):
        SinkProfile.load(folder)
    meta["schema_version"] = 2  # a profile identified by its norm weights only
    (folder / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match=r"version 2; .*Recalibrate: `sinkguard calibrate"):
        SinkProfile.load(folder)
    meta["schema_version"] = PROFILE_SCHEMA_VERSION
    meta["window_layers"] = "all"
    (folder / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="window_layers"):
        SinkProfile.load(folder)
    (folder / "profile.json").write_text("{")
    with pytest.raises(ProfileError, match="not valid JSON"):
        SinkProfile.load(folder)
    with pytest.raises(ProfileError, match="missing"):
        SinkProfile.load(tmp_path / "nowhere")
    profile.save(folder)
    (folder / "profile.safetensors").write_bytes(b"garbage")
    with pytest.raises(ProfileError, match="corrupt"):
        SinkProfile.load(folder)
