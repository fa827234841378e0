"""sinkguard's request middleware on vLLM's OpenAI server (installed by ``endpoints.py``).

Every JSON POST body, on any path (completions, chat, responses, messages, whatever vLLM adds;
under any ``--root-path``), is read and parsed once (:mod:`sinkguard.serving.request_body`), then
on the parsed request:

- arms as model names: a request for ``<model>:<policy>`` is served by ``<model>`` under that
  policy, its response tagged ``x-sinkguard-arm`` (``arms.py``); ``/v1/models`` lists every arm;
- request validation: an invalid ``vllm_xargs.sinkguard_*`` option, or the name of a policy the
  server does not have, gets HTTP 400 naming it before the request reaches the engine, which keeps
  serving everyone else;
- the live A/B experiment of the serve config's ``ab`` section (``ab_traffic.py``): requests that
  select no arm are assigned one, tagged and logged once;
- the detector's state (:class:`DetectorState`): a request whose policy will not run (the detector
  is off) is tagged ``x-sinkguard-applied: false``, or refused (HTTP 503) with
  ``when_detection_off: refuse``.

The body is serialised again only when it was rewritten (an arm routed or assigned).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi.responses import JSONResponse

from sinkguard.engines.vllm.ab_traffic import ABTraffic, is_generation
from sinkguard.engines.vllm.arms import ARM_HEADER, route_arm, with_arm_models
from sinkguard.errors import ConfigError
from sinkguard.interventions.policy import INLINE_POLICY, NO_POLICY
from sinkguard.serving.loader import enabled_config, served_policies
from sinkguard.serving.options import RequestOptions
from sinkguard.serving.request_body import parse_json_body

logger = logging.getLogger("sinkguard")
APPLIED_HEADER = "x-sinkguard-applied"  # "false" when the request's policy will not run (the detector is off)
UNAPPLIED_HEADER = "x-sinkguard-unapplied-reason"
MAX_VALIDATED_BODY = 64 << 20  # JSON bodies larger than this are left to vLLM's own limits


def error_response(message: str, status: int) -> JSONResponse:
    """An error in the OpenAI API's shape."""
    kind = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError"}.get(status, "ServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


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


class ServerState(Protocol):
    """What the middleware reads of the endpoint plugin (``endpoints.SinkguardEndpoints``)."""

    engine_client: Any  # None: no engine behind the server (unit tests)
    served_models: tuple[str, ...]
    detector: DetectorState
    when_detection_off: str


class RequestOptionsMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched). Every JSON POST body is
    parsed once and bounded (:mod:`sinkguard.serving.request_body`); on the parsed request it
    routes arm model names (``<served>:<arm>``, see ``arms.py``), validates sinkguard's request
    options, runs the live A/B experiment when the config has one (``ab_traffic.py``), and says
    whether the request's policy will run (``x-sinkguard-applied``). Responses of routed requests
    are tagged with ``x-sinkguard-arm``; ``/v1/models`` lists the arms."""

    def __init__(self, app: Any, endpoints: ServerState | None = None) -> None:
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
                await error_response(str(exc), 400)(scope, receive, send)
                return
            except Unavailable as exc:
                await error_response(str(exc), 503)(scope, receive, send)
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
            config = enabled_config()
            traffic = None
            if config is not None and config.ab is not None:
                from sinkguard.core.profile import SinkProfile

                policies = served_policies().policies
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
    return served_policies().arms  # none without a sinkguard config


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
    policies, scope = served_policies()
    return options.resolved_policy(policies, scope) if scope is not None else None
