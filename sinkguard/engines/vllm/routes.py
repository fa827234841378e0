"""``vllm.endpoint_plugins`` entry point: sinkguard's HTTP surface on vLLM's OpenAI server.

Opt-in like every endpoint plugin (``VLLM_PLUGINS`` must name ``sinkguard``). Adds

- ``GET /sinkguard/requests/{request_id}``: the sink events of a request, looked up by the
  ``id`` of its response (``cmpl-...`` / ``chatcmpl-...``) or by the ``X-Request-Id`` the client
  sent. Served from the workers through ``collective_rpc("sinkguard_lookup")``; token texts are
  decoded here, where the tokenizer lives.
- ``GET /sinkguard/status``: whether the detector is installed in the workers.
- a request-validation middleware: an invalid ``vllm_xargs.sinkguard_*`` option gets HTTP 400
  naming the option before the request reaches the engine, which keeps serving everyone else.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from sinkguard.errors import ConfigError
from sinkguard.serving.options import RequestOptions

VALIDATED_PATHS = ("/v1/completions", "/v1/chat/completions")


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}},
                        status_code=status)


class RequestOptionsMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in VALIDATED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        problem = _validate(body)
        if problem is not None:
            await _error(problem, 400)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validate(body: bytes) -> str | None:
    try:
        payload = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # vLLM answers malformed JSON itself
    xargs = payload.get("vllm_xargs") if isinstance(payload, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        RequestOptions.from_extra_args(xargs)
    except ConfigError as exc:
        return str(exc)
    return None


class SinkguardEndpoints:
    """The endpoint plugin object (``EndpointPlugin`` protocol)."""

    name = "sinkguard"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine_client: Any = None
        self.tokenizer: Any = None

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter(prefix="/sinkguard", tags=["sinkguard"])
        router.add_api_route("/requests/{request_id}", self.get_request, methods=["GET"])
        router.add_api_route("/status", self.get_status, methods=["GET"])
        app.include_router(router)
        app.add_middleware(RequestOptionsMiddleware)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        self.engine_client = engine_client
        source = getattr(args, "tokenizer", None) or getattr(args, "model", None)
        if engine_client is not None and source and not getattr(args, "skip_tokenizer_init", False):
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception:  # events still carry token ids
                self.tokenizer = None

    async def get_request(self, request_id: str, request: Request) -> JSONResponse:
        if self.engine_client is None:
            return _error("sinkguard: no engine behind this server", 503)
        per_worker = await self.engine_client.collective_rpc("sinkguard_lookup", args=(request_id,))
        records = next((r for r in per_worker if r), [])
        if not records:
            return _error(f"sinkguard: no record of request {request_id!r} (unknown, or evicted from the "
                          "bounded store of finished requests)", 404)
        for record in records:
            for event in record["events"]:
                if self.tokenizer is not None and event.get("token_id") is not None:
                    event["token"] = self.tokenizer.decode([event["token_id"]])
        return JSONResponse({"request_id": request_id, "requests": records})

    async def get_status(self) -> JSONResponse:
        if self.engine_client is None:
            return JSONResponse({"enabled": False})
        per_worker = await self.engine_client.collective_rpc("sinkguard_status")
        return JSONResponse({"workers": per_worker})
