"""Prefix-cache restore: the live requests' records and sink memory kept in step with
:class:`~sinkguard.serving.prefix_events.PrefixEventStore`.

A request that starts with tokens served from the engine's prefix cache was never run through the
detector for them, so their events (and the formation flags attention edits target) are read back
from the store instead; each step's completed blocks are stored for the requests that come later.
Engine-independent: the engine says how many tokens were cached, what a step ran (its layout and
positions) and, through a callable, a request's token ids; the hooks that learn this stay in the
engine's adapter (vLLM: ``engines/vllm/runtime.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sinkguard.interventions.attention_edits import SinkMemory
from sinkguard.serving.prefix_events import PrefixEventStore, Restored
from sinkguard.serving.records import RequestRecord


class PrefixRestore:
    """Reads cached prefix blocks back into records and sink memory, and commits completed blocks."""

    def __init__(self, store: PrefixEventStore, memory: SinkMemory, token_ids: Callable[[str], Sequence[int]]) -> None:
        self.store = store
        self.memory = memory  # shared with the step plans: restored formation flags are edit targets
        self.token_ids = token_ids  # a live request's prompt and output token ids so far
        self._missing: dict[str, list[int]] = {}  # cached blocks not in the store at the request's start

    def begin(self, record: RequestRecord, policy_key: str, cached_tokens: int) -> None:
        """A request seen for the first time, whose first ``cached_tokens`` tokens the engine served from
        its prefix cache (0: none): their events are read back now, or after the step if another request
        of the same step is still computing their blocks."""
        self.store.begin(record.request_id, policy_key)
        if cached_tokens <= 0:
            return
        block_size = self.store.block_size
        record.cached_prefix_tokens = cached_tokens
        record.next_position = cached_tokens  # not recomputed: read back
        full = cached_tokens // block_size
        record.cached_prefix_unknown_tokens = cached_tokens - full * block_size
        restored = self._restore(record, list(range(full)))
        if restored.missing:
            self._missing[record.request_id] = restored.missing

    def commit(self, query_start: np.ndarray, request_ids: list[str], positions: np.ndarray, scanned: bool,
               live: Mapping[str, RequestRecord]) -> None:
        """Store the blocks this step completed, then read back cached blocks that were missing at the
        step's start (another request of the same step was computing them). After an unscanned step
        the step's requests store nothing more: their later blocks' events would be incomplete."""
        store = self.store
        ends = (positions[query_start[1:] - 1] + 1).tolist()
        for request_id, upto in zip(request_ids, ends):
            if not scanned:
                store.forget(request_id)
            elif store.needs_commit(request_id, upto):
                store.commit(request_id, self.token_ids(request_id), upto,
                             tuple(self.memory.born(request_id).items()))
        for request_id in request_ids:
            missing = self._missing.pop(request_id, None)
            if missing:
                record = live[request_id]
                restored = self._restore(record, missing)
                record.cached_prefix_unknown_tokens += store.give_up(restored.missing)
                record.events.sort(key=lambda event: event["position"])  # the prefix's events lead, as in a recompute

    def forget(self, request_id: str) -> None:
        """The request is gone: nothing more to store or read back for it."""
        self.store.forget(request_id)
        self._missing.pop(request_id, None)

    def _restore(self, record: RequestRecord, blocks: list[int]) -> Restored:
        """Read the cached ``blocks`` of ``record``'s request back into its record and sink memory."""
        restored = self.store.restore(record.request_id, self.token_ids(record.request_id), blocks)
        if record.options.detect:
            for event in sorted(restored.events, key=lambda e: e.position):
                record.add(event, "prefill" if event.position < record.prompt_tokens else "decode")
        for position, layer in restored.formations:
            self.memory.flag(record.request_id, np.array([position]), layer)
        return restored
