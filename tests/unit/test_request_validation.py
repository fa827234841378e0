"""The request-option middleware on its own ASGI contract: any JSON POST carrying vllm_xargs, under
any root path, is checked before vLLM sees it; everything else passes through byte for byte."""

from __future__ import annotations

import asyncio
import json

import pytest

from sinkguard.engines.vllm.routes import RequestOptionsMiddleware


def call(path: str, body: dict | bytes, root_path: str = "", content_type: bytes = b"application/json"):
    seen: list[bytes] = []
    sent: list[dict] = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append(message["body"])

    async def receive():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path,
             "headers": [(b"content-type", content_type)]}
    asyncio.run(RequestOptionsMiddleware(app)(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, seen, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


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
    from sinkguard.engines.vllm import plugin, routes

    profile.save(tmp_path / "profile")
    (tmp_path / "policies.json").write_text(json.dumps({"policies": [
        {"name": "act", "interventions": [{"kind": "attention_redistribution", "beta": 0.0, "layers": [4]}]},
        {"name": "remove", "interventions": [{"kind": "mlp_projection_removal"}]}]}))
    (tmp_path / "serve.json").write_text(json.dumps({"profile": str(tmp_path / "profile"),
                                                     "policies": str(tmp_path / "policies.json")}))
    monkeypatch.setenv("SINKGUARD_CONFIG", str(tmp_path / "serve.json"))
    routes._POLICIES.clear()
    plugin._policy_file.cache_clear()
    yield
    routes._POLICIES.clear()


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
