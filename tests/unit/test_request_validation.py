"""The request-option middleware on its own ASGI contract: any JSON POST carrying vllm_xargs, under
any root path, is checked before vLLM sees it; everything else passes through byte for byte."""

from __future__ import annotations

import asyncio
import json

import pytest

from sinkguard.engines.vllm.middleware import RequestOptionsMiddleware


def call(path: str, body: dict | bytes, root_path: str = "", content_type: bytes = b"application/json",
         endpoints=None, headers: bool = False):
    """(status, bodies vLLM saw, response body[, response headers]); the app behind answers 200 only
    with ``endpoints`` (status None: it answered nothing)."""
    seen: list[bytes] = []
    sent: list[dict] = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append(message["body"])
        if endpoints is not None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path,
             "headers": [(b"content-type", content_type)]}
    asyncio.run(RequestOptionsMiddleware(app, endpoints)(scope, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), {})
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if headers:
        return start.get("status"), seen, body, dict(start.get("headers", ()))
    return start.get("status"), seen, body


def test_bad_option_is_rejected_on_any_path_and_root_path():
    for path, root in (("/v1/responses", ""), ("/v1/messages", ""), ("/api/v1/chat/completions", "/api"),
                       ("/invocations", "")):
        status, seen, body = call(path, {"model": "m", "vllm_xargs": {"sinkguard_max_events": -1}}, root)
        assert status == 400 and not seen and b"sinkguard_max_events" in body, path


def test_valid_and_unrelated_requests_pass_through_unchanged():
    payload = {"model": "m", "vllm_xargs": {"sinkguard_detect": False, "other_plugin": 3}}
    status, seen, _ = call("/v1/responses", payload)
    assert status is None and seen == [json.dumps(payload).encode()]
    status, seen, _ = call("/v1/audio/transcriptions", b"--boundary binary", content_type=b"multipart/form-data")
    assert status is None and seen == [b"--boundary binary"]


@pytest.fixture
def served_policies(tmp_path, monkeypatch, profile):
    """The middleware as in a server configured with a profile and two policies."""
    from sinkguard.serving import loader

    profile.save(tmp_path / "profile")
    (tmp_path / "policies.json").write_text(json.dumps({"policies": [
        {"name": "act", "interventions": [{"kind": "attention_redistribution", "beta": 0.0, "layers": [4]}]},
        {"name": "remove", "interventions": [{"kind": "mlp_projection_removal"}]}]}))
    (tmp_path / "serve.json").write_text(json.dumps({"profile": str(tmp_path / "profile"),
                                                     "policies": str(tmp_path / "policies.json")}))
    monkeypatch.setenv("SINKGUARD_CONFIG", str(tmp_path / "serve.json"))
    loader._POLICIES.clear()
    loader._policy_file.cache_clear()
    yield
    loader._POLICIES.clear()


def test_an_arm_model_name_is_routed_and_the_response_tagged(served_policies):
    sent: list[dict] = []
    seen: list[bytes] = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])
        assert dict(scope["headers"])[b"content-length"] == str(len(seen[0])).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": json.dumps({"model": "smol:act", "prompt": "hi"}).encode()}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"36")]}
    asyncio.run(RequestOptionsMiddleware(app)(scope, receive, send))
    assert json.loads(seen[0]) == {"model": "smol", "prompt": "hi", "vllm_xargs": {"sinkguard_policy": "act"}}
    assert (b"x-sinkguard-arm", b"act") in sent[0]["headers"]
    status, seen, body = call("/v1/completions", {"model": "smol:act", "vllm_xargs": {"sinkguard_policy": "remove"}})
    assert status == 400 and not seen and b"selects arm 'act'" in body
    status, seen, _ = call("/v1/completions", {"model": "smol:unknown"})  # not an arm: vLLM answers for itself
    assert status is None and json.loads(seen[0]) == {"model": "smol:unknown"}


def test_the_models_list_names_every_arm(served_policies):
    sent: list[dict] = []
    listing = json.dumps({"object": "list", "data": [{"id": "smol", "object": "model"}]}).encode()

    async def app(scope, receive, send):
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(listing)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": listing})

    async def send(message):
        sent.append(message)

    asyncio.run(RequestOptionsMiddleware(app)({"type": "http", "method": "GET", "path": "/v1/models", "headers": []},
                                              None, send))
    body = sent[1]["body"]
    assert [m["id"] for m in json.loads(body)["data"]] == ["smol", "smol:none", "smol:act", "smol:remove"]
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(body)).encode()


def test_malformed_requests_get_a_400_not_a_traceback():
    for payload, named in (({"model": "m", "vllm_xargs": ["sinkguard_detect", False]}, b"vllm_xargs must be"),
                           ({"model": "m", "vllm_xargs": "sinkguard_detect=false"}, b"vllm_xargs must be"),
                           ({"model": "m", "vllm_xargs": {"sinkguard_detect": "yes"}}, b"sinkguard_detect"),
                           (b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"nested deeper"),
                           (b'{"vllm_xargs": {"a": ' + b'{"b":' * 100 + b"1" + b"}" * 101 + b"}", b"nested deeper")):
        status, seen, body = call("/v1/completions", payload)
        assert status == 400 and not seen and named in body, payload


def test_an_unknown_arm_of_a_served_model_is_a_400_listing_the_arms(served_policies):
    from sinkguard.engines.vllm.endpoints import SinkguardEndpoints

    endpoints = SinkguardEndpoints()
    endpoints.served_models = ("smol", "other:7b")
    status, seen, body = call("/v1/completions", {"model": "smol:nope"}, endpoints=endpoints)
    assert status == 400 and not seen and b"smol:none, smol:act, smol:remove" in body
    for passing in ("other:7b", "elsewhere:nope"):  # a served name with a colon; another server's model
        status, seen, _ = call("/v1/completions", {"model": passing}, endpoints=endpoints)
        assert status == 200 and json.loads(seen[0]) == {"model": passing}


def test_requests_whose_policy_cannot_run_are_marked_or_refused(served_policies):
    from sinkguard.engines.vllm.endpoints import SinkguardEndpoints

    endpoints = SinkguardEndpoints()
    endpoints.detector.off_reason = "detection switched off by the operator"
    status, seen, _, headers = call("/v1/completions", {"model": "smol:act"}, endpoints=endpoints, headers=True)
    assert status == 200 and seen and headers[b"x-sinkguard-applied"] == b"false"
    assert headers[b"x-sinkguard-unapplied-reason"] == b"detection switched off by the operator"
    status, seen, _, headers = call("/v1/completions", {"model": "smol:none"}, endpoints=endpoints, headers=True)
    assert status == 200 and b"x-sinkguard-applied" not in headers  # nothing to run
    endpoints.when_detection_off = "refuse"
    status, seen, body = call("/v1/completions", {"model": "smol", "vllm_xargs": {"sinkguard_policy": "remove"}},
                              endpoints=endpoints)
    assert status == 503 and not seen and b"cannot run now" in body
    endpoints.detector.off_reason = None
    assert call("/v1/completions", {"model": "smol:act"}, endpoints=endpoints)[0] == 200
