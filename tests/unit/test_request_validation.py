"""The request-option middleware on its own ASGI contract: any JSON POST carrying vllm_xargs, under
any root path, is checked before vLLM sees it; everything else passes through byte for byte."""

from __future__ import annotations

import asyncio
import json

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
