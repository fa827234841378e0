from __future__ import annotations

import json

import pytest

from sinkguard.core.settings import ScanConfig, load_config
from sinkguard.errors import ConfigError


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"detector": {"cos_treshold": 0.8}}))
    with pytest.raises(ConfigError, match=r"detector\.cos_treshold"):
        load_config(path)


def test_out_of_range_value_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"attention": {"min_votes": 0}}))
    with pytest.raises(ConfigError, match=r"attention\.min_votes"):
        load_config(path)


def test_valid_file_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"detector": {"cos_threshold": 0.8, "lifetime": {"preset": "paper"}}}))
    config = load_config(path, max_tokens=100)
    assert config.detector.cos_threshold == 0.8
    assert config.detector.lifetime.preset == "paper"
    assert config.max_tokens == 100
    assert ScanConfig().detector.cos_threshold == 0.9


def test_not_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
