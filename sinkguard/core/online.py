"""Online detection: per engine step, per request, engine independent.

An engine adapter feeds one step at a time: :meth:`StepDetector.observe` with each decoder
layer's output and MLP output for the N tokens of the step (all scheduled requests, prefill
chunks and decode tokens together), then :meth:`StepDetector.finish` with the tokens' absolute
positions. Every token passes through all layers within one step, so a token's whole flag
column, hence its birth layer, lifetime and kind, is known at the end of the step that processed
it: no state is carried across steps except what :class:`RequestTracker` keeps per request.

The reference is the profile's stored per-layer direction (the request's own first token may be
a prefix-cache hit or several steps in the past); the window and the median MLP norm come from
the profile too. The arithmetic is :func:`~sinkguard.core.detection.detect_columns`, the same
function the offline scanner uses.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sinkguard.config import DetectorConfig, RequestOptions
from sinkguard.core.detection import SinkEvent, detect_columns
from sinkguard.core.trace import LayerStatistics, layer_statistics, stack_layers
from sinkguard.profile import SinkProfile


class StepDetector:
    """Detects sinks among the tokens of one engine step against a profile's reference."""

    def __init__(self, profile: SinkProfile, config: DetectorConfig | None = None) -> None:
        self.config = config or profile.meta.detector
        self.num_layers = profile.model.num_layers
        self.references = profile.reference_hidden_tensor()  # [L, d] unit rows
        self.window = profile.window_mask()
        self.mlp_median = profile.median_mlp_norm
        self.reference_position = profile.reference_position
        self._layers: list[LayerStatistics | None] = [None] * self.num_layers
        self._references_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _reference(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, torch.float32)
        if key not in self._references_on:
            refs = self.references.to(like.device, torch.float32)
            self._references_on[key] = refs / refs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self._references_on[key][layer : layer + 1]

    def start(self) -> None:
        self._layers = [None] * self.num_layers

    def observe(self, layer: int, hidden: torch.Tensor, mlp_out: torch.Tensor) -> None:
        """Reduce one layer's ``[N, d]`` output and MLP output to norms and cosines."""
        self._layers[layer] = layer_statistics(hidden, mlp_out, self._reference(layer, hidden), unit_references=True)

    @property
    def complete(self) -> bool:
        return all(stats is not None for stats in self._layers)

    def finish(self, positions: np.ndarray) -> list[tuple[int, SinkEvent]]:
        """``(column, event)`` for every flagged token of the step; columns index the N tokens."""
        if not self.complete:
            self.start()
            return []
        stats = stack_layers([s for s in self._layers if s is not None])
        self.start()
        positions = np.asarray(positions)
        columns = np.arange(positions.shape[0])
        events = detect_columns(
            stats["hidden_cos"][0], stats["mlp_norm"], stats["mlp_cos"][0], self.window, self.mlp_median,
            self.config, positions=columns, num_layers=self.num_layers,
        )
        out = []
        for event in events:
            column = event.position
            event.position = int(positions[column])
            event.is_reference = event.position == self.reference_position
            out.append((column, event))
        return out


@dataclass
class RequestRecord:
    """What sinkguard observed for one request."""

    request_id: str
    options: RequestOptions
    prompt_tokens: int = 0
    prefill_tokens_scanned: int = 0
    decode_tokens_scanned: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    events_dropped: int = 0
    kinds: Counter = field(default_factory=Counter)
    finished: bool = False
    started: float = field(default_factory=time.time)

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
        record = self.live.get(request_id)
        if record is None:
            try:
                options = RequestOptions.from_extra_args(extra_args)
            except Exception:  # validated at the API server; never fail a batch in the worker
                options = RequestOptions()
            if options.max_events > self.max_events_cap:
                options = options.model_copy(update={"max_events": self.max_events_cap})
            record = RequestRecord(request_id, options, prompt_tokens=prompt_tokens)
            self.live[request_id] = record
        return record

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
        """Records whose id is ``request_id`` or starts with ``request_id + '-'``.

        vLLM appends ``-<prompt index>`` and ``-<8 random chars>`` to the id the client sees.
        """
        prefix = request_id + "-"
        found = []
        for store in (self.live, self.finished):
            for rid, record in store.items():
                if rid == request_id or rid.startswith(prefix):
                    found.append(record.to_dict())
        return found
