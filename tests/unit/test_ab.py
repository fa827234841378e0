"""Live A/B assignment: weights, stickiness, configuration errors, the log."""

from __future__ import annotations

import random

import pytest
from scipy.stats import chisquare

from sinkguard.config import validate_config
from sinkguard.errors import ConfigError
from sinkguard.serving.ab import ABConfig, ABLog, assign, read_log, sticky_key


def test_traffic_splits_by_weight_within_sampling_error_and_users_stay_put():
    config = ABConfig(arms={"none": 0.7, "act": 0.2, "remove": 0.1})
    arms = [assign(config, f"user-{i}")[0] for i in range(6000)]
    counts = [arms.count(a) for a in ("none", "act", "remove")]
    assert chisquare(counts, [4200, 1200, 600]).pvalue > 0.001
    assert all(assign(config, f"user-{i}")[0] == arms[i] for i in range(200))  # sticky, across calls
    assert assign(config, "user-1") == (arms[1], "sticky")
    other_seed = config.model_copy(update={"seed": 1})
    assert [assign(other_seed, f"user-{i}")[0] for i in range(200)] != arms[:200]  # the seed reshuffles
    rng = random.Random(0)
    unkeyed = [assign(config, None, rng) for _ in range(3000)]
    assert {how for _, how in unkeyed} == {"random"}
    assert chisquare([sum(a == n for a, _ in unkeyed) for n in ("none", "act", "remove")],
                     [2100, 600, 300]).pvalue > 0.001


def test_sticky_keys_come_from_the_user_field_or_a_header():
    assert sticky_key(ABConfig(arms={"none": 1}), {}, {"user": "alice"}) == "alice"
    by_header = ABConfig(arms={"none": 1}, sticky="header:X-Session-Id")
    assert sticky_key(by_header, {"x-session-id": "s1"}, {"user": "alice"}) == "s1"
    assert sticky_key(by_header, {}, {}) is None


def test_bad_arm_configurations_fail_naming_the_field():
    with pytest.raises(ConfigError, match="arms"):
        validate_config(ABConfig, {"arms": {"none": 1, "act": 0}})
    with pytest.raises(ConfigError, match="control arm 'none'"):
        validate_config(ABConfig, {"arms": {"act": 1}})
    with pytest.raises(ConfigError, match="sticky"):
        validate_config(ABConfig, {"arms": {"none": 1}, "sticky": "cookie"})
    with pytest.raises(ConfigError, match=r"ab.arms: \['nope'\] are not configured policies"):
        ABConfig(arms={"none": 1, "nope": 1}).check_policies(["none", "act"])


def test_the_log_has_one_line_per_request(tmp_path):
    log = ABLog(tmp_path / "ab" / "log.jsonl")
    for i in range(3):
        log.append({"request_id": f"r{i}", "arm": "none"})
    assert [r["request_id"] for r in read_log(log.path)] == ["r0", "r1", "r2"]
