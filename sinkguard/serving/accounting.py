"""Per-request accounting in a serving engine: what each step means for each request's record.

A record opens when the detector first sees its request (options parsed, policy resolved, a cached
prefix read back), takes each step's tokens (prefill, decode, recomputed after a preemption), sink
events and applied edits, and closes into the finished store when the engine no longer runs the
request. This lives apart from the engine adapter so that it is the same for every engine: the
adapter supplies a step's layout (``query_start``, request ids), positions and events, and
describes a request on first sight (:class:`RequestStart`); its hooks, step plans and fault
handling stay in the adapter (vLLM: ``engines/vllm/runtime.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sinkguard.errors import ConfigError
from sinkguard.interventions.attention_edits import SinkMemory
from sinkguard.interventions.plan import AppliedEdit
from sinkguard.interventions.policy import NO_POLICY, ModelScope, PolicySet
from sinkguard.serving.options import policy_cache_key
from sinkguard.serving.prefix_restore import PrefixRestore
from sinkguard.serving.records import RequestRecord, RequestTracker

if TYPE_CHECKING:
    from sinkguard.serving.prometheus import SinkMetrics

logger = logging.getLogger("sinkguard")


@dataclass(frozen=True)
class RequestStart:
    """What the engine knows of a request when the detector first sees it."""

    prompt_tokens: int = 0
    extra_args: dict[str, Any] | None = None  # its sampling parameters' extra_args: the sinkguard options
    cached_tokens: int = 0  # leading tokens the engine served from its prefix cache (not run again)


class RequestAccounting:
    """The live requests' records in one engine worker, fed step by step.

    ``record`` False (tensor-parallel ranks > 0, which see the same hidden states as rank 0): records
    still open, for their policies, but take no tokens, events or edits. ``prefix``: the engine runs a
    prefix cache, whose cached blocks' events are read back (see :mod:`sinkguard.serving.prefix_restore`).
    """

    def __init__(self, tracker: RequestTracker, policies: PolicySet, scope: ModelScope, memory: SinkMemory,
                 describe: Callable[[str], RequestStart | None], *, record: bool = True,
                 metrics: SinkMetrics | None = None, model_name: str = "",
                 prefix: PrefixRestore | None = None) -> None:
        self.tracker = tracker
        self.policies = policies
        self.scope = scope
        self.memory = memory  # per request: its secondary sinks so far, forgotten with the request
        self.describe = describe  # None for a request the engine does not know (any more)
        self.record = record
        self.metrics = metrics
        self.model_name = model_name
        self.prefix = prefix
        self._started_unobserved: set[str] = set()  # requests that began while the detector was off
        self._warned_nonfinite = False

    # -- opening and closing ------------------------------------------------------------------
    def records(self, request_ids: Iterable[str]) -> list[RequestRecord]:
        """The live records of ``request_ids``, each opened on first sight."""
        live = self.tracker.live
        return [live.get(request_id) or self.open(request_id) for request_id in request_ids]

    def open(self, request_id: str) -> RequestRecord:
        """Open a record with the request's prompt length and options (once, not every step)."""
        start = self.describe(request_id)
        record = self.tracker.get(request_id, start.extra_args if start is not None else None,
                                  start.prompt_tokens if start is not None else 0)
        try:
            policy = record.options.resolved_policy(self.policies, self.scope)
        except ConfigError as exc:  # the API server answers 400; offline engines have no API server
            logger.warning("sinkguard: request %s is served without interventions: %s", request_id, exc)
            policy = self.policies.get(NO_POLICY)
        record.policy_name = policy.name
        record.interventions_policy = policy if policy.interventions else None  # None: nothing to plan
        if request_id in self._started_unobserved:
            self._started_unobserved.discard(request_id)
            record.policy_interrupted("detection was off when the request started")
        if self.prefix is not None and start is not None:
            self.prefix.begin(record, policy_cache_key(record.interventions_policy), start.cached_tokens)
        return record

    def retire_missing(self, running: Container[str]) -> None:
        """Close the records of requests the engine no longer runs (finished or aborted)."""
        self.tracker.retire_missing(running, on_retire=self._on_retire)

    def _on_retire(self, record: RequestRecord) -> None:
        self.memory.forget(record.request_id)
        if self.prefix is not None:
            self.prefix.forget(record.request_id)
        if self.metrics is not None:
            self.metrics.requests_finished.labels(self.model_name).inc()

    # -- detection off and on -----------------------------------------------------------------
    def interrupt(self, reason: str) -> None:
        """Detection goes off: the requests running now lose their policies, and their records say so."""
        for record in self.tracker.live.values():
            record.policy_interrupted(reason)

    def started_unobserved(self, running: Iterable[str]) -> None:
        """Detection is back: those of ``running`` without a record began while it was off."""
        self._started_unobserved = {r for r in running if r not in self.tracker.live}

    # -- steps --------------------------------------------------------------------------------
    def end_step(self, query_start: np.ndarray, request_ids: list[str], positions: np.ndarray, events: list | None,
                 input_ids: Any = None) -> None:
        """A step's tokens and events into its requests' records, then its completed prefix blocks into
        the store. ``events`` None: the step's activations were not usable (the step was not scanned);
        ``input_ids``: the step's token ids (a tensor, read only when there are events)."""
        if self.record:
            self._count(query_start, request_ids, positions, events, input_ids)
        if self.prefix is not None:  # every rank: attention edits read the restored formation flags
            self.prefix.commit(query_start, request_ids, positions, events is not None, self.tracker.live)

    def unscanned(self, request_ids: Iterable[str]) -> None:
        """A detector fault left the step of ``request_ids`` unobserved and without its interventions."""
        if not self.record:
            return
        live = self.tracker.live
        for request_id in request_ids:
            record = live.get(request_id) or self.open(request_id)
            record.unscanned_steps += 1
            record.policy_interrupted("a detector fault left a step without its interventions")

    def _count(self, query_start: np.ndarray, request_ids: list[str], positions: np.ndarray, events: list | None,
               input_ids: Any) -> None:
        records = self.records(request_ids)
        # A request's tokens in a step are consecutive positions (RequestRecord.account splits
        # them into prefill, decode and recomputed). Plain Python: a step has few requests.
        starts = query_start.tolist()
        first_positions = positions[query_start[:-1]].tolist()
        scanned_below = [record.next_position for record in records]
        step_prefill = step_decode = 0
        for i, record in enumerate(records):
            if events is None:
                record.unscanned_steps += 1
                continue
            prefill, decode = record.account(first_positions[i], starts[i + 1] - starts[i])
            step_prefill += prefill
            step_decode += decode
        if self.metrics is not None:
            if step_prefill:
                self.metrics.tokens_scanned.labels(self.model_name, "prefill").inc(step_prefill)
            if step_decode:
                self.metrics.tokens_scanned.labels(self.model_name, "decode").inc(step_decode)
        if events:
            token_ids = input_ids[: int(query_start[-1])].cpu().numpy() if input_ids is not None else None
            self._add_events(events, query_start, records, scanned_below, token_ids)

    def _add_events(self, events: list, query_start: np.ndarray, records: list[RequestRecord],
                    scanned_below: list[int], token_ids: np.ndarray | None) -> None:
        store = self.prefix.store if self.prefix is not None else None
        for column, event in events:
            i = int(np.searchsorted(query_start, column, side="right")) - 1
            record = records[i]
            if event.position < scanned_below[i]:
                continue  # recomputed after a preemption: recorded the first time
            if token_ids is not None:
                event.token_id = int(token_ids[column])
            if store is not None:
                store.add(record.request_id, (event,))  # whatever the request's options: the block's events
            if not record.options.detect:
                continue
            record.add(event, "prefill" if event.position < record.prompt_tokens else "decode")
            if self.metrics is not None and not event.is_reference:
                self.metrics.sinks_detected.labels(self.model_name, event.kind, str(event.birth_layer)).inc()

    # -- interventions ------------------------------------------------------------------------
    def applied(self, edits: list[AppliedEdit], request_ids: list[str]) -> None:
        """Edits one layer applied (``request_ids``: the step's requests, which ``edit.requests`` index)."""
        for edit in edits:
            kind = edit.intervention.kind
            if edit.nonfinite is not None:
                self._skipped_nonfinite(edit, request_ids)
            if self.record:
                counts = [edit.count] + [0] * (len(edit.positions) - 1) if edit.edited_rows else None
                for n, (request, position) in enumerate(zip(edit.requests.tolist(), edit.positions.tolist())):
                    self.tracker.live[request_ids[request]].add_intervention(
                        kind, edit.layer, position, counts[n] if counts else 1)
            if self.metrics is not None:
                self.metrics.interventions_applied.labels(self.model_name, edit.policy, kind).inc(edit.count)

    def _skipped_nonfinite(self, edit: AppliedEdit, request_ids: list[str]) -> None:
        """Edits whose result was not finite were skipped (the tokens kept their values): counted and
        marked on the requests, never against ``fault_limit`` (one client's policy must not remove the
        detector for everyone)."""
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            logger.warning("sinkguard: %s (policy %s) at layer %d gave a non-finite result; the edit was skipped "
                           "for those tokens (counted in faults_total{stage=\"nonfinite_edit\"})",
                           edit.intervention.kind, edit.policy, edit.layer)
        if self.record:
            for request in edit.nonfinite.tolist():
                record = self.tracker.live[request_ids[request]]
                record.nonfinite_edits += 1
                record.policy_interrupted("an edit gave a non-finite result and was skipped")
        if self.metrics is not None:
            self.metrics.faults.labels(self.model_name, "nonfinite_edit").inc(len(edit.nonfinite))
