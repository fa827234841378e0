"""Sink events of prefix-cached KV blocks, so a request that hits the prefix cache still gets them.

A token served from the prefix cache skips the forward pass: nothing observes it. But a token's
events (and, for attention redistribution, the formation flags that say which keys are sinks) are a
function of the tokens up to it and of the policy that shaped the activations, exactly what an
engine's prefix cache keys its KV blocks on. So each block's events are kept under a chain hash
like vLLM's block hash (parent block's hash, the block's token ids, and the policy instead of a
cache salt): when a block is fully computed its events are stored; when a request starts with ``k``
cached tokens its first ``k // block_size`` blocks' events are read back, token for token what a
recompute would have found.

The engine shares cached KV only between requests of one policy (the cache salt, see
:func:`sinkguard.serving.options.policy_cache_salt`); the policy in the hash keeps the same
separation here. The store is a bounded LRU; a block the engine still has cached but the store
already dropped is never guessed: the request's record counts its tokens as
``cached_prefix_unknown_tokens``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sinkguard.core.detection import SinkEvent


@dataclass(frozen=True)
class BlockEvents:
    """What one fully computed block holds: events at its positions, and formation flags
    ``(position, layer)`` of the requests whose sinks were tracked (attention redistribution)."""

    events: tuple[SinkEvent, ...] = ()
    formations: tuple[tuple[int, int], ...] = ()


EMPTY_BLOCK = BlockEvents()


def chain_hash(parent: bytes, token_ids: Sequence[int], policy_key: str) -> bytes:
    """The block's key: sha256 over its parent's key, its token ids and the policy."""
    digest = hashlib.sha256(parent)
    digest.update(policy_key.encode())
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


@dataclass
class _Pending:
    """A live request's hash chain and the events of its blocks not yet complete."""

    policy_key: str
    hashes: list[bytes] = field(default_factory=list)
    events: list[SinkEvent] = field(default_factory=list)


@dataclass
class Restored:
    """Cached blocks read back: their events and formation flags, and the blocks the store lacks."""

    events: list[SinkEvent]
    formations: list[tuple[int, int]]
    missing: list[int]


class PrefixEventStore:
    """Block events keyed by chain hash (bounded LRU), plus each live request's pending events."""

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        if block_size <= 0 or capacity_blocks <= 0:
            raise ValueError("block_size and capacity_blocks must be positive")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[bytes, BlockEvents] = OrderedDict()
        self._live: dict[str, _Pending] = {}
        self.hits = 0  # blocks read back for cache hits
        self.misses = 0  # cached blocks whose events the store no longer had

    def __len__(self) -> int:
        return len(self._blocks)

    def _hash(self, pending: _Pending, token_ids: Sequence[int], upto_blocks: int) -> None:
        """Extend the request's hash chain to ``upto_blocks`` blocks."""
        size = self.block_size
        for block in range(len(pending.hashes), upto_blocks):
            parent = pending.hashes[-1] if pending.hashes else b""
            pending.hashes.append(chain_hash(parent, token_ids[block * size:(block + 1) * size], pending.policy_key))

    def begin(self, request_id: str, policy_key: str) -> None:
        self._live[request_id] = _Pending(policy_key)

    def restore(self, request_id: str, token_ids: Sequence[int], blocks: Sequence[int]) -> Restored:
        """The events of the request's cached ``blocks`` (indices; the engine served them from its
        prefix cache). ``Restored.missing``: those the store does not hold (yet), all of them for a
        request the store no longer follows (forgotten after an unscanned step)."""
        pending = self._live.get(request_id)
        if pending is None:
            return Restored([], [], list(blocks))
        self._hash(pending, token_ids, max(blocks, default=-1) + 1)
        events: list[SinkEvent] = []
        formations: list[tuple[int, int]] = []
        missing = []
        for block in blocks:
            key = pending.hashes[block]
            found = self._blocks.get(key)
            if found is None:
                missing.append(block)
                continue
            self._blocks.move_to_end(key)
            self.hits += 1
            events.extend(found.events)
            formations.extend(found.formations)
        return Restored(events, formations, missing)

    def give_up(self, missing: Sequence[int]) -> int:
        """Count blocks whose events are lost for good; returns their tokens."""
        self.misses += len(missing)
        return len(missing) * self.block_size

    def needs_commit(self, request_id: str, computed_tokens: int) -> bool:
        pending = self._live.get(request_id)
        return pending is not None and computed_tokens // self.block_size > len(pending.hashes)

    def add(self, request_id: str, events: Sequence[SinkEvent]) -> None:
        """Events the detector found for the request in this step (positions not yet committed)."""
        pending = self._live.get(request_id)
        if pending is not None:
            pending.events.extend(events)

    def commit(self, request_id: str, token_ids: Sequence[int], computed_tokens: int,
               formations: Sequence[tuple[int, int]] = ()) -> None:
        """Store every block below ``computed_tokens`` the request completed since its last commit;
        ``formations``: its formation flags so far (those inside the stored blocks are kept)."""
        pending = self._live.get(request_id)
        if pending is None:
            return
        size = self.block_size
        done = len(pending.hashes)
        full = computed_tokens // size
        if full <= done:
            return
        self._hash(pending, token_ids, full)
        for block in range(done, full):
            lo, hi = block * size, (block + 1) * size
            key = pending.hashes[block]
            if key in self._blocks:  # computed again (e.g. after a preemption): same tokens, same events
                self._blocks.move_to_end(key)
                continue
            events = tuple(e for e in pending.events if lo <= e.position < hi)
            flagged = tuple((p, layer) for p, layer in formations if lo <= p < hi)
            self._blocks[key] = BlockEvents(events, flagged) if events or flagged else EMPTY_BLOCK
            if len(self._blocks) > self.capacity_blocks:
                self._blocks.popitem(last=False)
        pending.events = [e for e in pending.events if e.position >= full * size]

    def forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self._blocks), "capacity_blocks": self.capacity_blocks, "block_size": self.block_size,
                "hits": self.hits, "misses": self.misses}
