"""The live A/B experiment inside vLLM's API server: the ASGI side of :mod:`sinkguard.serving.ab`.

For each completions / chat request (``middleware.py`` calls :meth:`ABTraffic.begin`): decide its arm,
inject the arm's policy, ask for the generated tokens' log-probabilities when the client did not;
then watch the response go out (tag ``x-sinkguard-arm``, read ids, usage, log-probabilities and
time to first token, strip what sinkguard added) and, once it is complete, queue its log record.
Records are completed with the request's sink and intervention counts from the workers in batches
(one ``collective_rpc`` per batch, off the response path), then written to the log exactly once and
counted in the per-arm ``sinkguard:ab_*`` metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sinkguard.engines.vllm.arms import ARM_HEADER
from sinkguard.serving.ab import ABLog, Decision, ResponseObserver, decide_arm, request_logprobs
from sinkguard.serving.settings import ABConfig

logger = logging.getLogger("sinkguard")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
FLUSH_DELAY_S = 0.05  # records arriving within this are completed with one RPC
Rpc = Callable[[str, tuple], Awaitable[list[Any]]]


def is_generation(scope: dict) -> bool:
    return scope.get("path", "").endswith(GENERATION_PATHS)


@dataclass
class Trial:
    """One request in the experiment."""

    decision: Decision
    observer: ResponseObserver
    row: dict[str, Any]


class ABTraffic:
    def __init__(self, config: ABConfig, policies: list[str], model_name: str, rpc: Rpc | None,
                 metrics: bool, acting_arms: frozenset[str] = frozenset(),
                 detector_off: Callable[[], str | None] | None = None) -> None:
        self.config = config
        self.policies = policies
        self.acting_arms = acting_arms  # arms whose policy has interventions (``inline`` always)
        self.detector_off = detector_off  # why the workers' detector is off, as the API server last saw it
        self.model_name = model_name
        self.rpc = rpc
        self.rng = random.Random(config.seed)
        self.log = ABLog(config.log) if config.log else None
        self.metrics = None
        if metrics:
            from sinkguard.serving.prometheus import ab_metrics

            self.metrics = ab_metrics()
        self._queue: list[dict[str, Any]] = []
        self._flusher: asyncio.Task | None = None

    def begin(self, scope: dict, payload: dict[str, Any], named_arm: str | None) -> Trial:
        """The request's trial; ``payload`` (the parsed body) is rewritten in place to run under its arm.
        ConfigError (HTTP 400) for an override naming no policy or contradicting the request."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        decision = decide_arm(self.config, payload, headers, named_arm, self.policies, self.rng)
        chat = scope["path"].endswith("/chat/completions")
        strip = self.config.record_logprobs and request_logprobs(payload, chat)
        observer = ResponseObserver(chat=chat, stream=bool(payload.get("stream")), strip=strip,
                                    echo=bool(payload.get("echo")))
        row: dict[str, Any] = {"time": round(time.time(), 6), "endpoint": scope["path"], "arm": decision.arm,
                               "assignment": decision.assignment, "user": decision.key_hash,
                               "stream": observer.stream}
        if self.config.log_prompts:
            row["prompt"] = payload.get("messages") if chat else payload.get("prompt")
        return Trial(decision, observer, row)

    @staticmethod
    def observing(send: Any, trial: Trial) -> Any:
        """``send`` that tags the response with its arm and passes its body through the observer.
        A whole (non-streamed) answer is held until complete, so its length can be set right."""
        observer = trial.observer
        start: dict | None = None

        async def observed(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                observer.status = message.get("status", 0)
                headers = [*message.get("headers", ()), (ARM_HEADER.encode(), trial.decision.arm.encode())]
                if observer.status != 200:  # an error passes untouched
                    await send({**message, "headers": headers})
                    return
                # the observer may rewrite the body (stripped log-probabilities): its length changes
                start = {**message, "headers": [(k, v) for k, v in headers if k.lower() != b"content-length"]}
                if observer.stream:
                    await send(start)
                    start = None
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            more = bool(message.get("more_body"))
            data = observer.body(message.get("body", b""), more)
            if start is not None:  # a whole answer, held until its last part
                if more:
                    return
                await send({**start, "headers": [*start["headers"], (b"content-length", str(len(data)).encode())]})
                start = None
            await send({**message, "body": data})

        return observed

    def finish(self, trial: Trial) -> None:
        """The response is done (or the client left): queue its record (completed and written soon).
        A request vLLM refused before its engine ran it (HTTP 4xx: unknown model, invalid field) is no
        part of the experiment: neither logged nor counted."""
        observer = trial.observer
        if 400 <= observer.status < 500:
            return
        try:
            trial.row.update(observer.summary())
        except Exception:  # still logged, without what could not be read
            logger.exception("sinkguard: A/B response summary failed")
        if observer.failed:
            trial.row["observer_failed"] = True
        if observer.status == 0 or (observer.status == 200 and observer.finished_at is None):
            trial.row["abandoned"] = True  # the client left (or the server stopped) before the response ended
        self._queue.append(trial.row)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(FLUSH_DELAY_S)
                batch, self._queue = self._queue, []
                counts = await self._counts([r["response_id"] for r in batch if r.get("response_id")])
                for row in batch:
                    try:
                        self._write(row, counts.get(row.get("response_id") or ""))
                    except Exception:  # one bad record must not lose the rest of the batch
                        logger.exception("sinkguard: A/B record not written: %s", row.get("response_id"))
        finally:
            self._flusher = None

    async def _counts(self, response_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not response_ids or self.rpc is None:
            return {}
        try:
            merged: dict[str, dict[str, Any]] = {}
            for per_worker in await self.rpc("sinkguard_summaries", (response_ids,)):
                merged.update(per_worker or {})
            return merged
        except Exception:  # the log must not lose the request for want of its counts
            logger.exception("sinkguard: A/B sink counts unavailable for %d requests", len(response_ids))
            return {}

    def _write(self, row: dict[str, Any], counts: dict[str, Any] | None) -> None:
        row["policy"] = counts["policy"] if counts else None  # None: the workers kept no record of it
        if row.get("prompt_tokens") is None and counts:  # a stream reports usage only when asked to
            row["prompt_tokens"] = counts.get("prompt_tokens")
        self._applied(row, counts)
        row["secondary_sinks"] = counts["sink_counts"]["secondary"] if counts else None
        row["interventions"] = counts["interventions"] if counts else None
        row["tokens_scanned"] = counts["tokens_scanned"] if counts else None
        if counts and counts["interventions_applied"]:
            row["interventions_applied"] = counts["interventions_applied"]
        if self.log is not None:
            try:
                self.log.append(row)
            except OSError:
                logger.exception("sinkguard: cannot append to the A/B log %s", self.log.path)
        if self.metrics is not None:
            self._count(row)

    def _applied(self, row: dict[str, Any], counts: dict[str, Any] | None) -> None:
        """Whether the arm's interventions ran on every token of the request (False: it was served
        like ``none`` in part or whole, e.g. with the detector off; None: unknown, no record)."""
        if row["arm"] not in self.acting_arms:
            row["applied"] = True  # nothing to run
        elif counts is not None:
            row["applied"] = bool(counts.get("applied", True))
            if not row["applied"]:
                row["unapplied_reason"] = counts.get("unapplied_reason")
        elif self.detector_off is not None and self.detector_off() is not None:
            row["applied"], row["unapplied_reason"] = False, self.detector_off()
        else:
            row["applied"] = None

    def _count(self, row: dict[str, Any]) -> None:
        m, labels = self.metrics, (self.model_name, row["arm"])
        m.requests.labels(*labels, row["assignment"]).inc()
        if row.get("status") != 200 or row.get("abandoned"):  # no whole answer to measure
            return
        m.latency.labels(*labels).observe(row["latency_s"])
        if row.get("ttft_s") is not None:
            m.ttft.labels(*labels).observe(row["ttft_s"])
        if row.get("completion_tokens"):
            m.generated_tokens.labels(*labels).inc(row["completion_tokens"])
        if row.get("mean_logprob") is not None:
            m.mean_logprob.labels(*labels).observe(row["mean_logprob"])
        if row.get("secondary_sinks"):
            m.secondary_sinks.labels(*labels).inc(row["secondary_sinks"])
        if row.get("interventions"):
            m.interventions.labels(*labels).inc(row["interventions"])
