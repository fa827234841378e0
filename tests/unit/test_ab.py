"""Live A/B assignment: weights, stickiness, configuration errors, the log."""

from __future__ import annotations

import json
import random

import pytest
from scipy.stats import chisquare

from sinkguard.core.settings import validate_config
from sinkguard.errors import ConfigError
from sinkguard.serving.ab import (
    ABConfig,
    ABLog,
    ResponseObserver,
    assign,
    decide_arm,
    read_log,
    request_logprobs,
    sticky_key,
)


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


POLICIES = ["none", "act", "remove"]


def decide(payload: dict, headers: dict | None = None, named: str | None = None, **config):
    return decide_arm(ABConfig(arms={"none": 1, "act": 1}, **config), payload, headers or {}, named, POLICIES,
                      random.Random(0))


def test_explicit_choices_win_and_contradictions_are_refused():
    payload = {"user": "alice"}
    decision = decide(payload)
    assert decision.assignment == "sticky" and payload["vllm_xargs"] == {"sinkguard_policy": decision.arm}
    assert decision.key_hash and "alice" not in decision.key_hash
    assert decide({}, named="remove").arm == "remove"  # an arm model name, already routed
    assert decide({"vllm_xargs": {"sinkguard_policy": "act"}}) == decide({}, named="act")
    assert decide({}, {"x-sinkguard-arm": "remove"}).assignment == "explicit"
    inline = {"vllm_xargs": {"sinkguard_inline_policy": "{}"}}
    assert decide(inline).arm == "inline" and "sinkguard_policy" not in inline["vllm_xargs"]
    with pytest.raises(ConfigError, match="'nope' is not a configured policy"):
        decide({}, {"x-sinkguard-arm": "nope"})
    with pytest.raises(ConfigError, match="selects arm 'remove' but the request selects 'act'"):
        decide({}, {"x-sinkguard-arm": "remove"}, named="act")
    assert decide({}, {"x-exp": "act"}, override_header="X-Exp").arm == "act"


def test_logprobs_are_requested_only_when_missing_and_never_with_echo():
    completions, chat = {}, {}
    assert request_logprobs(completions, chat=False) and completions["logprobs"] == 0
    assert request_logprobs(chat, chat=True) and chat == {"logprobs": True, "top_logprobs": 0}
    assert not request_logprobs({"logprobs": 3}, chat=False)
    assert not request_logprobs({"echo": True}, chat=False)
    assert not request_logprobs({"logprobs": True, "top_logprobs": 2}, chat=True)


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_streamed_answers_are_read_across_message_boundaries_and_stripped():
    chunks = [{"id": "cmpl-1", "choices": [{"text": t, "logprobs": {"token_logprobs": [lp], "tokens": [t]}}]}
              for t, lp in (("a", -1.0), ("b", -2.0), ("c", -0.5))]
    chunks.append({"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}})
    raw = sse(*chunks)
    observer = ResponseObserver(chat=False, stream=True, strip=True)
    observer.status = 200
    sent = b"".join(observer.body(raw[i:i + 7], more=i + 7 < len(raw)) for i in range(0, len(raw), 7))
    events = [e for e in sent.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and len(events) == len(chunks) + 1
    assert all(c.get("logprobs") is None for e in events[:-1] for c in json.loads(e[5:])["choices"])
    summary = observer.summary()
    assert summary["response_id"] == "cmpl-1" and summary["completion_tokens"] == 3
    assert summary["mean_logprob"] == pytest.approx(-3.5 / 3) and summary["ttft_s"] is not None


def test_whole_answers_keep_what_the_client_asked_for():
    answer = {"id": "chatcmpl-2", "choices": [{"message": {"content": "hi"}, "logprobs": {"content": [
        {"token": "hi", "logprob": -0.25, "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    kept = ResponseObserver(chat=True, stream=False, strip=False)
    kept.status = 200
    raw = json.dumps(answer).encode()
    assert kept.body(raw[:10], more=True) == b"" and kept.body(raw[10:], more=False) == raw
    assert kept.summary()["mean_logprob"] == -0.25 and kept.summary()["prompt_tokens"] == 5
    assert kept.summary()["ttft_s"] is None  # only streamed answers have a time to first token
    stripped = ResponseObserver(chat=True, stream=False, strip=True)
    stripped.status = 200
    assert json.loads(stripped.body(raw, more=False))["choices"][0]["logprobs"] is None
    failed = ResponseObserver(chat=True, stream=False, strip=True)
    failed.status = 400
    assert failed.body(b'{"error": 1}', more=False) == b'{"error": 1}' and failed.summary()["mean_logprob"] is None


def test_echoed_prompt_log_probabilities_are_not_counted_as_generated():
    answer = {"id": "cmpl-3", "choices": [{"text": "xy", "logprobs": {"token_logprobs": [None, -5.0, -5.0, -1.0]}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    observer = ResponseObserver(chat=False, stream=False, strip=False, echo=True)
    observer.status = 200
    observer.body(json.dumps(answer).encode(), more=False)
    assert observer.summary()["mean_logprob"] == -1.0


def test_a_server_with_a_bad_experiment_does_not_start(tmp_path, monkeypatch):
    from sinkguard.serving.loader import CONFIG_ENV, enabled_config

    policies = tmp_path / "policies.json"
    policies.write_text(json.dumps({"policies": [{"name": "act", "interventions": [
        {"kind": "attention_redistribution", "beta": 0.2}]}]}))
    config = tmp_path / "serve.json"
    monkeypatch.setenv(CONFIG_ENV, str(config))
    config.write_text(json.dumps({"profile": "p", "policies": str(policies), "ab": {"arms": {"none": 1, "acts": 1}}}))
    with pytest.raises(ConfigError, match=r"ab.arms: \['acts'\] are not configured policies"):
        enabled_config()
    config.write_text(json.dumps({"profile": "p", "ab": {"arms": {"none": -1}}}))
    with pytest.raises(ConfigError, match=r"ab.arms: .*finite and > 0"):
        enabled_config()
    config.write_text(json.dumps({"profile": "p", "ab": {"arms": {"none": 1}, "log": "/proc/nope/l.jsonl"}}))
    with pytest.raises(ConfigError, match="ab.log"):
        enabled_config()


def test_a_response_the_observer_cannot_read_passes_through_untouched():
    good = {"id": "cmpl-4", "choices": [{"text": "a", "logprobs": {"token_logprobs": [-1.0]}}]}
    odd = {"id": "cmpl-4", "choices": [{"text": "b", "logprobs": {"token_logprobs": ["not a number"]}}]}
    raw = sse(good, odd, good)
    observer = ResponseObserver(chat=False, stream=True, strip=False)
    observer.status = 200
    sent = b"".join(observer.body(raw[i:i + 50], more=i + 50 < len(raw)) for i in range(0, len(raw), 50))
    assert sent == raw and observer.failed  # every byte, in order, once
    whole = ResponseObserver(chat=False, stream=False, strip=True)
    whole.status = 200
    body = json.dumps(odd).encode()
    assert whole.body(body[:9], more=True) == b"" and whole.body(body[9:], more=False) == body and whole.failed


def test_the_log_has_only_requests_that_reached_the_engine_and_says_what_ran(tmp_path):
    """4xx answers (vLLM refused the request before its engine) are not logged; a response the client
    left is marked abandoned; an acting arm's row says whether its policy ran, from the record."""
    import asyncio

    from sinkguard.engines.vllm.ab_traffic import ABTraffic

    records = {"cmpl-ran": {"policy": "act", "prompt_tokens": 7, "applied": True, "unapplied_reason": None,
                            "sink_counts": {"secondary": 2}, "interventions": 3, "tokens_scanned": 9,
                            "interventions_applied": {}},
               "cmpl-off": {"policy": "act", "prompt_tokens": 5, "applied": False, "sink_counts": {"secondary": 0},
                            "unapplied_reason": "detection switched off by the operator", "interventions": 0,
                            "tokens_scanned": 5, "interventions_applied": {}}}

    async def rpc(method, args):
        return [{i: records[i] for i in args[0] if i in records}]

    async def run() -> None:
        traffic = ABTraffic(ABConfig(arms={"none": 1, "act": 1}, log=str(tmp_path / "ab.jsonl")), ["none", "act"],
                            "m", rpc, metrics=False, acting_arms=frozenset({"act"}), detector_off=lambda: None)
        scope = {"path": "/v1/completions", "headers": []}

        async def respond(status: int, body: bytes | None, arm: str = "act") -> None:
            trial = traffic.begin(scope, {"model": "m", "prompt": "hi", "stream": True,
                                          "vllm_xargs": {"sinkguard_policy": arm}}, None)

            async def send(message):
                pass

            send = traffic.observing(send, trial)
            await send({"type": "http.response.start", "status": status, "headers": []})
            if body is not None:
                await send({"type": "http.response.body", "body": body, "more_body": True})
                if b"left" not in body:
                    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            traffic.finish(trial)

        await respond(404, b'{"error": "The model `m2` does not exist."}')
        await respond(400, b'{"error": "invalid user"}')
        await respond(200, b'data: {"id": "cmpl-ran", "choices": [{"text": "a"}]}\n\n')
        await respond(200, b'data: {"id": "cmpl-off", "choices": [{"text": "a"}]}\n\n')
        await respond(200, b'data: {"id": "cmpl-left", "choices": [{"text": "a"}]}\n\n')  # no end: client left
        await respond(200, b'data: {"id": "cmpl-plain", "choices": [{"text": "a"}]}\n\n', arm="none")
        while traffic._flusher is not None:
            await asyncio.sleep(0.01)

    asyncio.run(run())
    rows = {r["response_id"]: r for r in read_log(tmp_path / "ab.jsonl")}
    assert set(rows) == {"cmpl-ran", "cmpl-off", "cmpl-left", "cmpl-plain"}  # the 4xx answers are not there
    assert rows["cmpl-ran"]["applied"] is True and rows["cmpl-ran"]["prompt_tokens"] == 7  # streamed: from the record
    assert rows["cmpl-off"]["applied"] is False and "switched off" in rows["cmpl-off"]["unapplied_reason"]
    assert rows["cmpl-left"]["abandoned"] is True and rows["cmpl-left"]["applied"] is None  # no record: unknown
    assert rows["cmpl-plain"]["applied"] is True and not rows["cmpl-plain"].get("abandoned")
