"""Per-request sink records in a serving engine: open while the request runs, then kept in a
bounded store of finished requests for lookup (``GET /sinkguard/requests/{id}``).

Lookups are exact. A client knows a request by the ``id`` of its response (``cmpl-X``,
``chatcmpl-X``, ``resp_X``) or by the ``X-Request-Id`` header it sent (``X``); vLLM 0.32 turns
that into an internal id by appending a prompt index (completions: ``-0``), 8 random characters
(``-1a2b3c4d``) and, for ``n > 1``, a sample prefix (``1_``). :func:`client_ids` undoes exactly
that grammar, so ``cmpl`` or the first characters of an id never match anything, and a lookup is
one dict access, not a scan of the store.
"""

from __future__ import annotations

import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

from sinkguard.core.detection import SinkEvent
from sinkguard.serving.options import RequestOptions

_RANDOM_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # vllm.v1.engine.input_processor.assign_request_id
_SAMPLE_PREFIX = re.compile(r"^(\d+)_")  # vllm.v1.engine.parallel_sampling.ParentRequest.get_child_info
_COMPLETION_INDEX = re.compile(r"-\d+$")  # completions always append f"-{prompt index}"
_RESPONSE_PREFIXES = ("cmpl-", "chatcmpl-")
RECORD_OVERHEAD_BYTES = 512  # a record's fixed fields, as Python objects (measured ~450)
EVENT_BYTES = 640  # one event dict in memory (measured ~560 with its 14 keys)


def client_ids(internal_id: str) -> tuple[int, list[str]]:
    """``(sample index, ids a client may use)`` for a vLLM-internal request id."""
    sample = 0
    if match := _SAMPLE_PREFIX.match(internal_id):
        sample, internal_id = int(match.group(1)), internal_id[match.end():]
    response_id = _RANDOM_SUFFIX.sub("", internal_id)
    if response_id.startswith("cmpl-"):
        response_id = _COMPLETION_INDEX.sub("", response_id)
    names = [response_id]
    for prefix in _RESPONSE_PREFIXES:
        if response_id.startswith(prefix) and len(response_id) > len(prefix):
            names.append(response_id[len(prefix):])  # the X-Request-Id the client sent
    return sample, names


@dataclass
class RequestRecord:
    """What sinkguard observed for one request."""

    request_id: str
    options: RequestOptions
    prompt_tokens: int = 0
    sample_index: int = 0  # which of the n samples (n > 1 fans a request out into n engine requests)
    prefill_tokens_scanned: int = 0
    decode_tokens_scanned: int = 0
    prefill_steps: int = 0  # engine steps that carried part of the prompt (>1: chunked prefill)
    recomputed_tokens: int = 0  # tokens run again after a preemption (not scanned twice)
    unscanned_steps: int = 0  # steps of this request the detector could not scan (faults, untrusted capture)
    next_position: int = 0  # positions below this have been scanned
    cached_prefix_tokens: int = 0  # served from the engine's prefix cache: events read back, not scanned
    cached_prefix_unknown_tokens: int = 0  # of those, tokens whose events were no longer kept (never guessed)
    events: list[dict[str, Any]] = field(default_factory=list)
    events_dropped: int = 0
    policy_name: str = "none"  # the policy the request runs (``inline`` for its own), as recorded and counted
    interventions_policy: Any = field(default=None, repr=False)  # its resolved Policy; None: nothing to edit
    interventions: list[dict[str, Any]] = field(default_factory=list)  # edits that fired (bounded like events)
    interventions_applied: Counter = field(default_factory=Counter)  # by intervention kind
    nonfinite_edits: int = 0  # token edits skipped because their result was not finite (the token kept its value)
    unapplied: str | None = None  # why the policy did not run on all of the request's tokens (None: it did)
    _listed: set = field(default_factory=set, repr=False)  # (kind, layer, position) already in interventions
    kinds: Counter = field(default_factory=Counter)
    finished: bool = False
    finished_at: float = 0.0

    def account(self, first_position: int, num_tokens: int) -> tuple[int, int]:
        """Count a step's ``num_tokens`` consecutive tokens of this request starting at
        ``first_position``; returns the fresh ``(prefill, decode)`` tokens. Those below what was
        already scanned are a recompute after a preemption (same tokens, same KV): counted apart,
        and :meth:`fresh` tells callers not to record their events twice."""
        recomputed = min(max(self.next_position - first_position, 0), num_tokens)
        self.recomputed_tokens += recomputed
        self.next_position = max(self.next_position, first_position + num_tokens)
        if not self.options.detect:
            return 0, 0
        fresh = num_tokens - recomputed
        prefill = min(max(self.prompt_tokens - (first_position + recomputed), 0), fresh)
        self.prefill_tokens_scanned += prefill
        self.prefill_steps += prefill > 0
        self.decode_tokens_scanned += fresh - prefill
        return prefill, fresh - prefill

    def add(self, event: SinkEvent, phase: str) -> None:
        self.kinds["reference" if event.is_reference else event.kind] += 1
        if len(self.events) >= self.options.max_events:
            self.events_dropped += 1
            return
        record = event.to_dict()
        record["phase"] = phase
        self.events.append(record)

    def add_intervention(self, kind: str, layer: int, position: int, count: int = 1) -> None:
        """An edit at ``layer`` on ``position`` (MLP: the edited token; attention: the sink key whose
        attention was scaled), counted ``count`` times and listed once."""
        self.interventions_applied[kind] += count
        entry = (kind, layer, position)
        if entry not in self._listed and len(self.interventions) < self.options.max_events:
            self._listed.add(entry)
            self.interventions.append({"intervention": kind, "layer": layer, "position": position})

    def policy_interrupted(self, reason: str) -> None:
        """Some of this request's tokens ran without its policy (detector off, a faulted step, an edit
        skipped): say so, the first reason kept. Nothing to say for a request without interventions."""
        if self.interventions_policy is not None and self.unapplied is None:
            self.unapplied = reason

    @property
    def approx_bytes(self) -> int:
        return RECORD_OVERHEAD_BYTES + EVENT_BYTES * (len(self.events) + len(self.interventions))

    def to_dict(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The record as JSON; ``offset``/``limit`` page through its events."""
        end = len(self.events) if limit is None else min(len(self.events), offset + limit)
        return {
            "request_id": self.request_id,
            "sample_index": self.sample_index,
            "finished": self.finished,
            "prompt_tokens": self.prompt_tokens,
            "tokens_scanned": {"prefill": self.prefill_tokens_scanned, "decode": self.decode_tokens_scanned},
            "prefill_steps": self.prefill_steps,
            "recomputed_tokens": self.recomputed_tokens,
            "cached_prefix_tokens": self.cached_prefix_tokens,
            "cached_prefix_unknown_tokens": self.cached_prefix_unknown_tokens,
            "unscanned_steps": self.unscanned_steps,
            "sink_counts": {k: self.kinds.get(k, 0) for k in ("reference", "primary", "secondary", "noise")},
            "events_dropped": self.events_dropped,
            "events_total": len(self.events),
            "events_offset": offset,
            "events": [dict(e) for e in self.events[offset:end]],
            "policy": self.policy_name,
            "applied": self.unapplied is None,
            "unapplied_reason": self.unapplied,
            "nonfinite_edits": self.nonfinite_edits,
            "interventions_applied": dict(self.interventions_applied),
            "interventions": [dict(e) for e in self.interventions[offset:offset + (limit or len(self.interventions))]],
        }


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    """Counts of one client request's records (its n samples summed): what an A/B log line keeps."""
    kinds: Counter = Counter()
    applied: Counter = Counter()
    for record in records:
        kinds.update(record.kinds)
        applied.update(record.interventions_applied)
    return {"policy": records[0].policy_name if records else None,
            "prompt_tokens": records[0].prompt_tokens if records else None,
            "tokens_scanned": sum(r.prefill_tokens_scanned + r.decode_tokens_scanned for r in records),
            "unscanned_steps": sum(r.unscanned_steps for r in records),
            "sink_counts": {k: kinds.get(k, 0) for k in ("primary", "secondary", "noise")},
            "interventions": sum(applied.values()), "interventions_applied": dict(applied),
            "applied": all(r.unapplied is None for r in records),
            "unapplied_reason": next((r.unapplied for r in records if r.unapplied is not None), None)}


class RequestTracker:
    """Per-request records: live while the request runs, then a store of finished ones bounded by
    count, bytes and age (oldest dropped first)."""

    def __init__(self, max_finished: int = 4096, max_events_cap: int = 1024, max_bytes: int = 64 << 20,
                 ttl_seconds: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.live: dict[str, RequestRecord] = {}
        self.finished: OrderedDict[str, RequestRecord] = OrderedDict()
        self.max_finished = max_finished
        self.max_events_cap = max_events_cap
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.finished_bytes = 0
        self._clock = clock
        self._by_client_id: dict[str, set[str]] = {}  # client-visible id -> internal ids

    def get(self, request_id: str, extra_args: dict[str, Any] | None, prompt_tokens: int) -> RequestRecord:
        """The live record of ``request_id``, created (options parsed once) on first sight."""
        record = self.live.get(request_id)
        if record is None:
            sample, names = client_ids(request_id)
            record = self.live[request_id] = self._new_record(request_id, extra_args, prompt_tokens, sample)
            for name in names:
                self._by_client_id.setdefault(name, set()).add(request_id)
        return record

    def _new_record(self, request_id: str, extra_args: dict[str, Any] | None, prompt_tokens: int,
                    sample: int) -> RequestRecord:
        try:
            options = RequestOptions.from_extra_args(extra_args, strict=False)  # as vLLM coerced them
        except Exception:  # validated at the API server; never fail a batch in the worker
            options = RequestOptions()
        if options.max_events > self.max_events_cap:
            options = options.model_copy(update={"max_events": self.max_events_cap})
        return RequestRecord(request_id, options, prompt_tokens=prompt_tokens, sample_index=sample)

    def retire_missing(self, running: Container[str], on_retire: Callable[[RequestRecord], None] | None = None) -> None:
        """Move records of requests the engine no longer runs (finished or aborted) to the store."""
        now = self._clock()
        for request_id in [r for r in self.live if r not in running]:
            record = self.live.pop(request_id)
            record.finished, record.finished_at = True, now
            if on_retire is not None:
                on_retire(record)
            self.finished[request_id] = record
            self.finished_bytes += record.approx_bytes
        self.evict(now)

    def evict(self, now: float | None = None) -> None:
        """Drop the oldest finished records beyond the count, byte and age limits."""
        now = self._clock() if now is None else now
        while self.finished:
            request_id, oldest = next(iter(self.finished.items()))
            if (len(self.finished) <= self.max_finished and self.finished_bytes <= self.max_bytes
                    and now - oldest.finished_at <= self.ttl_seconds):
                break
            self._forget(request_id, self.finished.pop(request_id))

    def _forget(self, request_id: str, record: RequestRecord) -> None:
        self.finished_bytes -= record.approx_bytes
        for name in client_ids(request_id)[1]:
            internal = self._by_client_id.get(name)
            if internal is not None:
                internal.discard(request_id)
                if not internal:
                    del self._by_client_id[name]

    def find(self, client_id: str) -> list[RequestRecord]:
        """Records of the request(s) a client knows as ``client_id`` (exact; samples in order)."""
        self.evict()
        records = []
        for request_id in self._by_client_id.get(client_id, ()):
            record = self.live.get(request_id) or self.finished.get(request_id)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.sample_index, r.request_id))

    def lookup(self, client_id: str, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        return [record.to_dict(offset, limit) for record in self.find(client_id)]

    def summaries(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        """:func:`summarize` for each of ``client_ids`` that has records (one call for a batch)."""
        found = {client_id: self.find(client_id) for client_id in client_ids}
        return {client_id: summarize(records) for client_id, records in found.items() if records}
