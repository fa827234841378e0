"""Arms as model names: routing a request, refusing contradictions, listing the arms."""

from __future__ import annotations

import pytest

from sinkguard.engines.vllm.arms import route_arm, split_arm, with_arm_models
from sinkguard.errors import ConfigError

ARMS = ("none", "act", "remove")


def test_a_model_name_selects_an_arm_and_other_names_pass_unchanged():
    payload = {"model": "smollm2:act", "prompt": "hi"}
    assert route_arm(payload, ARMS) == "act"
    assert payload == {"model": "smollm2", "prompt": "hi", "vllm_xargs": {"sinkguard_policy": "act"}}
    for model in ("smollm2", "org/model:v2", "smollm2:nope", ":act", None, 3):
        payload = {"model": model}
        assert route_arm(payload, ARMS) is None and payload == {"model": model}
    assert split_arm("org/model:v2:remove", ARMS) == ("org/model:v2", "remove")
    same = {"model": "m:act", "vllm_xargs": {"sinkguard_policy": "act", "sinkguard_detect": False}}
    assert route_arm(same, ARMS) == "act" and same["vllm_xargs"]["sinkguard_detect"] is False


def test_contradicting_selections_are_refused():
    with pytest.raises(ConfigError, match="selects arm 'act' but vllm_xargs.sinkguard_policy selects 'remove'"):
        route_arm({"model": "m:act", "vllm_xargs": {"sinkguard_policy": "remove"}}, ARMS)
    with pytest.raises(ConfigError, match="inline policy"):
        route_arm({"model": "m:act", "vllm_xargs": {"sinkguard_inline_policy": "{}"}}, ARMS)


def test_models_list_gains_one_entry_per_arm():
    listed = with_arm_models({"object": "list", "data": [{"id": "smollm2", "object": "model", "root": "/m"}]}, ARMS)
    ids = [m["id"] for m in listed["data"]]
    assert ids == ["smollm2", "smollm2:none", "smollm2:act", "smollm2:remove"]
    assert listed["data"][2]["parent"] == "smollm2" and listed["data"][2]["root"] == "/m"
    assert with_arm_models({"error": "x"}, ARMS) == {"error": "x"}
