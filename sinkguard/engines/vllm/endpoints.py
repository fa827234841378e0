"""``vllm.endpoint_plugins`` entry point: sinkguard's HTTP surface on vLLM's OpenAI server.

Opt-in like every endpoint plugin (``VLLM_PLUGINS`` must name ``sinkguard``). Adds

- ``GET /sinkguard/requests/{request_id}?offset=&limit=``: the sink record of a request, looked
  up by the exact ``id`` of its response (``cmpl-...`` / ``chatcmpl-...``) or by the
  ``X-Request-Id`` the client sent (see :mod:`sinkguard.serving.records` for the grammar); events
  are paged (at most :data:`MAX_PAGE_EVENTS` per response). Token texts are decoded here with the
  engine's own tokenizer.
- ``GET /sinkguard/status`` and ``POST /sinkguard/detection`` (``{"enabled": bool}``): the
  detector's state in every worker, and the operator's switch (removes or reinstalls the layer
  observers at run time).
- the request middleware (``middleware.py``): arms as model names, request validation, the live
  A/B experiment, the detector's state per request.

Who may call these routes: ``access.py``. The workers answer through ``collective_rpc``
(``worker_rpc.py``).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from sinkguard.engines.vllm.access import ADMIN_TOKEN_ENV, Access
from sinkguard.engines.vllm.middleware import DetectorState, RequestOptionsMiddleware, error_response
from sinkguard.errors import ConfigError
from sinkguard.serving.loader import enabled_config

DEFAULT_PAGE_EVENTS = 256
MAX_PAGE_EVENTS = 1024


def _page(value: str | None, default: int, low: int, high: int, name: str) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {number}")
    return number


class SinkguardEndpoints:
    """The endpoint plugin object (``EndpointPlugin`` protocol)."""

    name = "sinkguard"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine_client: Any = None
        self.access = Access([], None)
        self.served_models: tuple[str, ...] = ()
        self.detector = DetectorState()
        self.when_detection_off = "mark"

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter(prefix="/sinkguard", tags=["sinkguard"])
        router.add_api_route("/requests/{request_id}", self.get_request, methods=["GET"])
        router.add_api_route("/status", self.get_status, methods=["GET"])
        router.add_api_route("/detection", self.set_detection, methods=["POST"])
        app.include_router(router)
        app.add_middleware(RequestOptionsMiddleware, endpoints=self)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        self.engine_client = engine_client
        api_keys = list(getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")])
        self.access = Access(api_keys, os.environ.get(ADMIN_TOKEN_ENV))
        self.served_models = tuple(getattr(args, "served_model_name", None) or [getattr(args, "model", "")])
        config = enabled_config()
        self.when_detection_off = config.when_detection_off if config is not None else "mark"

    def _tokenizer(self) -> Any:
        try:  # the engine's own (tokenizer mode, revision, trust_remote_code as configured); None if skipped
            return self.engine_client.tokenizer
        except Exception:
            return None

    async def get_request(self, request_id: str, request: Request) -> JSONResponse:
        if not self.access.may_read_records(request):
            return error_response("Unauthorized", 401)
        if self.engine_client is None:
            return error_response("sinkguard: no engine behind this server", 503)
        try:
            offset = _page(request.query_params.get("offset"), 0, 0, 1 << 31, "offset")
            limit = _page(request.query_params.get("limit"), DEFAULT_PAGE_EVENTS, 1, MAX_PAGE_EVENTS, "limit")
        except ConfigError as exc:
            return error_response(str(exc), 400)
        per_worker = await self.engine_client.collective_rpc("sinkguard_lookup", args=(request_id, offset, limit))
        records = next((r for r in per_worker if r), [])
        if not records:
            return error_response(f"sinkguard: no record of request {request_id!r} (ids match exactly; unknown, or "
                          "evicted from the bounded store of finished requests)", 404)
        tokenizer = self._tokenizer()
        for record in records:
            for event in record["events"]:
                if tokenizer is not None and event.get("token_id") is not None:
                    event["token"] = tokenizer.decode([event["token_id"]])
        return JSONResponse({"request_id": request_id, "requests": records})

    async def get_status(self, request: Request) -> JSONResponse:
        if not self.access.may_administer(request):
            return error_response("Unauthorized", 401)
        if self.engine_client is None:
            return JSONResponse({"enabled": False, "workers": []})
        per_worker = await self.engine_client.collective_rpc("sinkguard_status")
        self.detector.note(per_worker)
        return JSONResponse({"enabled": bool(per_worker) and all(w.get("enabled") for w in per_worker),
                             "workers": per_worker})

    async def set_detection(self, request: Request) -> JSONResponse:
        if not self.access.may_administer(request):
            return error_response("Unauthorized", 401)
        try:
            enabled = (await request.json())["enabled"]
            if not isinstance(enabled, bool):
                raise TypeError
        except Exception:
            return error_response('body must be {"enabled": true|false}', 400)
        if self.engine_client is None:
            return error_response("sinkguard: no engine behind this server", 503)
        per_worker = await self.engine_client.collective_rpc("sinkguard_set_detection", args=(enabled,))
        self.detector.note(await self.engine_client.collective_rpc("sinkguard_status"))
        return JSONResponse({"enabled": bool(per_worker) and all(per_worker), "workers": per_worker})
