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
- arms as model names: every configured policy is listed in ``/v1/models`` as ``<model>:<policy>``
  (plus ``<model>:none``), and a request for such a name is served by ``<model>`` under that
  policy, its response tagged ``x-sinkguard-arm`` (``arms.py``);
- the live A/B experiment of the serve config's ``ab`` section (``ab_traffic.py``): requests that
  select no arm are assigned one, tagged and logged once;
- a request-validation middleware: an invalid ``vllm_xargs.sinkguard_*`` option in the JSON body
  of *any* POST (completions, chat, responses, messages, whatever vLLM adds; under any
  ``--root-path``), or the name of a policy the server does not have, gets HTTP 400 naming it
  before the request reaches the engine, which keeps serving everyone else.

Access: vLLM's ``--api-key`` (or ``VLLM_API_KEY``) guards only ``/v1``-style prefixes, so these
routes check it themselves, the same way (``Authorization: Bearer``, constant-time compare). With
``SINKGUARD_ADMIN_TOKEN`` set, status and the switch need that token instead, and record lookups
accept either.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from sinkguard.engines.vllm.ab_traffic import ABTraffic, is_generation
from sinkguard.engines.vllm.arms import ARM_HEADER, route_arm, with_arm_models
from sinkguard.errors import ConfigError
from sinkguard.interventions.policy import INLINE_POLICY, NO_POLICY
from sinkguard.serving.options import RequestOptions
from sinkguard.serving.request_body import parse_json_body

logger = logging.getLogger("sinkguard")
ADMIN_TOKEN_ENV = "SINKGUARD_ADMIN_TOKEN"
APPLIED_HEADER = "x-sinkguard-applied"  # "false" when the request's policy will not run (the detector is off)
UNAPPLIED_HEADER = "x-sinkguard-unapplied-reason"
DEFAULT_PAGE_EVENTS = 256
MAX_PAGE_EVENTS = 1024
MAX_VALIDATED_BODY = 64 << 20  # JSON bodies larger than this are left to vLLM's own limits


def _error(message: str, status: int) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError"}.get(status, "ServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


def _digests(tokens: list[str | None]) -> list[bytes]:
    return [hashlib.sha256(t.encode()).digest() for t in tokens if t]


class Access:
    """Bearer-token checks (vLLM's AuthenticationMiddleware semantics) for sinkguard's routes."""

    def __init__(self, api_keys: list[str | None], admin_token: str | None) -> None:
        self.api_keys = _digests(api_keys)
        self.admin = _digests([admin_token])

    @staticmethod
    def _matches(request: Request, digests: list[bytes]) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        found = False
        for expected in digests:  # no early exit: constant time in the number of keys
            found |= secrets.compare_digest(digest, expected)
        return found

    def may_read_records(self, request: Request) -> bool:
        if not self.api_keys and not self.admin:
            return True
        return self._matches(request, self.api_keys + self.admin)

    def may_administer(self, request: Request) -> bool:
        digests = self.admin or self.api_keys
        return not digests or self._matches(request, digests)


def _is_json(scope: dict) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


class Unavailable(Exception):
    """A request the server cannot honour now (HTTP 503)."""


@dataclass
class Admission:
    """What the middleware decided for one request."""

    body: bytes  # what vLLM receives (rewritten when an arm was routed or assigned)
    arm: str | None = None  # the arm a model name selected (tagged on the response)
    trial: Any = None  # its trial in the live A/B experiment
    unapplied: str | None = None  # why its policy's interventions will not run (the detector is off)


class DetectorState:
    """The API server's view of the workers' detector: policies act only while it is installed.

    Read from the workers' status at most every :data:`REFRESH_S` (in the background, so a request
    never waits for it, except with ``when_detection_off: refuse``, where a stale view is refreshed
    first) and at once when the operator switches detection. A response's ``x-sinkguard-applied``
    header is this view at the request's start; records and the A/B log say per request."""

    REFRESH_S = 1.0

    def __init__(self) -> None:
        self.off_reason: str | None = None
        self._checked = time.monotonic()  # start-up checked every worker (``sinkguard serve``)
        self._refresh: asyncio.Task | None = None

    def note(self, per_worker: list[dict[str, Any]]) -> None:
        off = [w for w in per_worker if not w.get("enabled")]
        self.off_reason = (off[0].get("removed_reason") or "the detector is not installed") if off else None
        self._checked = time.monotonic()

    async def current(self, engine: Any, wait: bool) -> str | None:
        """Why the detector is off (None: it runs), refreshed when older than REFRESH_S."""
        if engine is not None and time.monotonic() - self._checked > self.REFRESH_S:
            if self._refresh is None:
                self._refresh = asyncio.get_running_loop().create_task(self._read(engine))
            if wait:
                await asyncio.shield(self._refresh)
        return self.off_reason

    async def _read(self, engine: Any) -> None:
        try:
            self.note(await engine.collective_rpc("sinkguard_status"))
        except Exception:  # keep the last view; the next request tries again
            logger.exception("sinkguard: the detector's status could not be read")
            self._checked = time.monotonic()
        finally:
            self._refresh = None


class RequestOptionsMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched). Every JSON POST body is
    parsed once and bounded (:mod:`sinkguard.serving.request_body`); on the parsed request it
    routes arm model names (``<served>:<arm>``, see ``arms.py``), validates sinkguard's request
    options, runs the live A/B experiment when the config has one (``ab_traffic.py``), and says
    whether the request's policy will run (``x-sinkguard-applied``). Responses of routed requests
    are tagged with ``x-sinkguard-arm``; ``/v1/models`` lists the arms."""

    def __init__(self, app: Any, endpoints: SinkguardEndpoints | None = None) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path", "").endswith("/v1/models"):
            await self.app(scope, receive, _listing_arms(send))
            return
        if scope["type"] != "http" or scope.get("method") != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        admission = Admission(body)
        if size <= MAX_VALIDATED_BODY:
            try:
                admission = await self._admit(scope, body)
            except ConfigError as exc:
                await _error(str(exc), 400)(scope, receive, send)
                return
            except Unavailable as exc:
                await _error(str(exc), 503)(scope, receive, send)
                return
        if admission.body is not body:  # rewritten: its length changed
            body = admission.body
            scope = {**scope, "headers": [(k, str(len(body)).encode() if k == b"content-length" else v)
                                          for k, v in scope.get("headers", ())]}
        trial = admission.trial
        if admission.unapplied is not None:
            send = _tagging(send, [(APPLIED_HEADER, "false"), (UNAPPLIED_HEADER, admission.unapplied)])
        if trial is not None:
            send = self._traffic().observing(send, trial)
        elif admission.arm is not None:
            send = _tagging(send, [(ARM_HEADER, admission.arm)])
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if trial is not None:
                self._traffic().finish(trial)  # once per request, whether it completed, failed or was abandoned

    async def _admit(self, scope: dict, body: bytes) -> Admission:
        """Parse, route, validate and assign the request; ConfigError is the client's (HTTP 400)."""
        payload = parse_json_body(body)
        if not isinstance(payload, dict):
            return Admission(body)  # not a JSON object: vLLM answers it
        if "vllm_xargs" in payload and not isinstance(payload["vllm_xargs"], dict):
            raise ConfigError("vllm_xargs must be a JSON object")
        served = self.endpoints.served_models if self.endpoints is not None else ()
        arm = route_arm(payload, _arms(), served)
        policy = _resolved_policy(payload)
        trial = None
        if is_generation(scope) and (traffic := self._traffic()) is not None:
            trial = _beginning(traffic, scope, payload, arm)
            if trial is not None and policy is not None and trial.decision.arm != policy.name:
                policy = _resolved_policy(payload)  # the arm the experiment assigned
        unapplied = None
        runs_model = not scope.get("path", "").endswith("tokenize")  # (de)tokenizing reaches no engine step
        if policy is not None and policy.interventions and self.endpoints is not None and runs_model:
            refuse = self.endpoints.when_detection_off == "refuse"
            unapplied = await self.endpoints.detector.current(self.endpoints.engine_client, wait=refuse)
            if unapplied is not None and refuse:
                raise Unavailable(f"sinkguard: policy {policy.name!r} cannot run now: {unapplied} "
                                  "(when_detection_off: refuse)")
        if arm is not None or trial is not None:
            body = json.dumps(payload).encode()
        return Admission(body, arm, trial, unapplied)

    def _traffic(self) -> ABTraffic | None:
        """The server's A/B experiment (None: none configured), built on first use."""
        if not _TRAFFIC:
            from sinkguard.engines.vllm.plugin import enabled_config

            config = enabled_config()
            traffic = None
            if config is not None and config.ab is not None:
                from sinkguard.core.profile import SinkProfile

                policies, _ = _policies()
                endpoints = self.endpoints
                engine = endpoints.engine_client if endpoints is not None else None
                rpc = (lambda method, args: engine.collective_rpc(method, args=args)) if engine is not None else None
                acting = frozenset([INLINE_POLICY, *(p.name for p in policies.policies if p.interventions)])
                traffic = ABTraffic(config.ab, [NO_POLICY, *policies.names],
                                    config.model_name or SinkProfile.load(config.profile).model.name, rpc,
                                    config.metrics, acting_arms=acting,
                                    detector_off=(lambda: endpoints.detector.off_reason) if endpoints else None)
            _TRAFFIC.append(traffic)
        return _TRAFFIC[0]


_TRAFFIC: list[ABTraffic | None] = []


def _beginning(traffic: ABTraffic, scope: dict, payload: dict[str, Any], arm: str | None) -> Any:
    """``traffic.begin``, fail-open: a fault in the experiment serves the request outside it (its own
    or the default policy, unlogged) rather than failing it. ConfigError is the client's (HTTP 400)."""
    try:
        return traffic.begin(scope, payload, arm)
    except ConfigError:
        raise
    except Exception:
        logger.exception("sinkguard: A/B assignment failed; request served outside the experiment")
        return None


def _arms() -> list[str]:
    policies, scope = _policies()
    return [NO_POLICY, *policies.names] if scope is not None else []  # none without a sinkguard config


def _tagging(send: Any, headers: list[tuple[str, str]]) -> Any:
    """``send`` that adds ``headers`` to the response."""
    encoded = [(name.encode(), value.encode("latin-1", "replace")) for name, value in headers]

    async def tagged(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *encoded]}
        await send(message)

    return tagged


def _listing_arms(send: Any) -> Any:
    """Wrap ``send`` so ``/v1/models``' JSON answer also lists every ``<model>:<arm>``."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def listing(message: dict) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                body = json.dumps(with_arm_models(json.loads(body), _arms())).encode()
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        headers = [(k, str(len(body)).encode() if k == b"content-length" else v) for k, v in start.get("headers", ())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return listing


def _resolved_policy(payload: dict[str, Any]) -> Any:
    """The policy the request runs under (None without a sinkguard config); ConfigError names a bad
    ``vllm_xargs.sinkguard_*`` option or policy."""
    options = RequestOptions.from_extra_args(payload.get("vllm_xargs"))
    policies, scope = _policies()
    return options.resolved_policy(policies, scope) if scope is not None else None


_POLICIES: list[Any] = []


def _policies() -> tuple[Any, Any]:
    """The server's policy set and its model's scope, read once (the same file and code the workers use)."""
    if not _POLICIES:
        from sinkguard.core.profile import SinkProfile
        from sinkguard.engines.vllm.plugin import enabled_config, serve_policies
        from sinkguard.interventions.policy import ModelScope

        config = enabled_config()
        scope = ModelScope.from_profile(SinkProfile.load(config.profile)) if config is not None else None
        _POLICIES.append((serve_policies(config), scope))
    return _POLICIES[0]


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
        from sinkguard.engines.vllm.plugin import enabled_config

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
            return _error("Unauthorized", 401)
        if self.engine_client is None:
            return _error("sinkguard: no engine behind this server", 503)
        try:
            offset = _page(request.query_params.get("offset"), 0, 0, 1 << 31, "offset")
            limit = _page(request.query_params.get("limit"), DEFAULT_PAGE_EVENTS, 1, MAX_PAGE_EVENTS, "limit")
        except ConfigError as exc:
            return _error(str(exc), 400)
        per_worker = await self.engine_client.collective_rpc("sinkguard_lookup", args=(request_id, offset, limit))
        records = next((r for r in per_worker if r), [])
        if not records:
            return _error(f"sinkguard: no record of request {request_id!r} (ids match exactly; unknown, or "
                          "evicted from the bounded store of finished requests)", 404)
        tokenizer = self._tokenizer()
        for record in records:
            for event in record["events"]:
                if tokenizer is not None and event.get("token_id") is not None:
                    event["token"] = tokenizer.decode([event["token_id"]])
        return JSONResponse({"request_id": request_id, "requests": records})

    async def get_status(self, request: Request) -> JSONResponse:
        if not self.access.may_administer(request):
            return _error("Unauthorized", 401)
        if self.engine_client is None:
            return JSONResponse({"enabled": False, "workers": []})
        per_worker = await self.engine_client.collective_rpc("sinkguard_status")
        self.detector.note(per_worker)
        return JSONResponse({"enabled": bool(per_worker) and all(w.get("enabled") for w in per_worker),
                             "workers": per_worker})

    async def set_detection(self, request: Request) -> JSONResponse:
        if not self.access.may_administer(request):
            return _error("Unauthorized", 401)
        try:
            enabled = (await request.json())["enabled"]
            if not isinstance(enabled, bool):
                raise TypeError
        except Exception:
            return _error('body must be {"enabled": true|false}', 400)
        if self.engine_client is None:
            return _error("sinkguard: no engine behind this server", 503)
        per_worker = await self.engine_client.collective_rpc("sinkguard_set_detection", args=(enabled,))
        self.detector.note(await self.engine_client.collective_rpc("sinkguard_status"))
        return JSONResponse({"enabled": bool(per_worker) and all(per_worker), "workers": per_worker})
