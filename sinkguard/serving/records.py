"""Per-request sink records in a serving engine: open while the request runs, then kept in a
bounded store of finished requests for lookup (``GET /sinkguard/requests/{id}``)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

from sinkguard.core.detection import SinkEvent
from sinkguard.serving.options import RequestOptions


@dataclass
class RequestRecord:
    """What sinkguard observed for one request."""

    request_id: str
    options: RequestOptions
    prompt_tokens: int = 0
    prefill_tokens_scanned: int = 0
    decode_tokens_scanned: int = 0
    prefill_steps: int = 0  # engine steps that carried part of the prompt (>1: chunked prefill)
    events: list[dict[str, Any]] = field(default_factory=list)
    events_dropped: int = 0
    kinds: Counter = field(default_factory=Counter)
    finished: bool = False

    def add(self, event: SinkEvent, phase: str) -> None:
        self.kinds["reference" if event.is_reference else event.kind] += 1
        if len(self.events) >= self.options.max_events:
            self.events_dropped += 1
            return
        record = event.to_dict()
        record["phase"] = phase
        self.events.append(record)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "finished": self.finished,
            "prompt_tokens": self.prompt_tokens,
            "tokens_scanned": {"prefill": self.prefill_tokens_scanned, "decode": self.decode_tokens_scanned},
            "prefill_steps": self.prefill_steps,
            "sink_counts": {k: self.kinds.get(k, 0) for k in ("reference", "primary", "secondary", "noise")},
            "events_dropped": self.events_dropped,
            "events": self.events,
        }


class RequestTracker:
    """Per-request records: live while the request runs, then a bounded LRU of finished ones."""

    def __init__(self, max_finished: int = 4096, max_events_cap: int = 1024) -> None:
        self.live: dict[str, RequestRecord] = {}
        self.finished: OrderedDict[str, RequestRecord] = OrderedDict()
        self.max_finished = max_finished
        self.max_events_cap = max_events_cap

    def get(self, request_id: str, extra_args: dict[str, Any] | None, prompt_tokens: int) -> RequestRecord:
        """The live record of ``request_id``, created (options parsed once) on first sight."""
        record = self.live.get(request_id)
        if record is None:
            record = self.live[request_id] = self._new_record(request_id, extra_args, prompt_tokens)
        return record

    def _new_record(self, request_id: str, extra_args: dict[str, Any] | None, prompt_tokens: int) -> RequestRecord:
        try:
            options = RequestOptions.from_extra_args(extra_args)
        except Exception:  # validated at the API server; never fail a batch in the worker
            options = RequestOptions()
        if options.max_events > self.max_events_cap:
            options = options.model_copy(update={"max_events": self.max_events_cap})
        return RequestRecord(request_id, options, prompt_tokens=prompt_tokens)

    def retire_missing(self, running: Container[str], on_retire: Callable[[RequestRecord], None] | None = None) -> None:
        """Move records of requests the engine no longer runs (finished or aborted) to the LRU."""
        for request_id in [r for r in self.live if r not in running]:
            record = self.live.pop(request_id)
            record.finished = True
            if on_retire is not None:
                on_retire(record)
            self.finished[request_id] = record
            while len(self.finished) > self.max_finished:
                self.finished.popitem(last=False)

    def lookup(self, request_id: str) -> list[dict[str, Any]]:
        """Records of the request(s) a client knows as ``request_id``.

        vLLM's internal id is ``<response id>[-<prompt index>]-<8 random chars>``, and the response
        id is ``cmpl-<X-Request-Id>`` / ``chatcmpl-<X-Request-Id>`` when the client sent that header,
        so both the response id and the bare header value are accepted.
        """
        prefixes = tuple(f"{p}{request_id}-" for p in ("", "cmpl-", "chatcmpl-"))
        found = []
        for store in (self.live, self.finished):
            for rid, record in store.items():
                if rid == request_id or rid.startswith(prefixes):
                    found.append(record.to_dict())
        return found
