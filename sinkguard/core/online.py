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

from collections import Counter, OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sinkguard.config import DetectorConfig, RequestOptions
from sinkguard.core.detection import SinkEvent, detect_columns
from sinkguard.core.trace import LayerStatistics, layer_statistics, stack_layers, to_arrays, unit_rows
from sinkguard.profile import SinkProfile


class StepDetector:
    """Detects sinks among the tokens of one engine step against a profile's reference.

    Small steps (decode, up to ``buffer_tokens`` tokens) copy each layer's activations into a
    persistent ``[L, buffer_tokens, d]`` buffer and reduce all layers at once at the end: two
    tiny ops per layer instead of five, which is what decode latency is made of. Large steps
    (prefill) reduce each layer as it comes, so memory stays O(tokens x d).
    """

    def __init__(self, profile: SinkProfile, config: DetectorConfig | None = None, buffer_tokens: int = 256) -> None:
        self.config = config or profile.meta.detector
        self.num_layers = profile.model.num_layers
        self.references = profile.reference_hidden_tensor()  # [L, d] unit rows
        self.window = profile.window_mask()
        self.mlp_median = profile.median_mlp_norm
        self.reference_position = profile.reference_position
        self.buffer_tokens = buffer_tokens
        self._layers: list[LayerStatistics | None] = [None] * self.num_layers
        self._seen: list[bool] = [False] * self.num_layers
        self._tokens = 0
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._references_on: dict[torch.device, torch.Tensor] = {}

    def _reference(self, device: torch.device) -> torch.Tensor:
        if device not in self._references_on:
            self._references_on[device] = unit_rows(self.references.to(device, torch.float32))[:, None, :]
        return self._references_on[device]  # [L, 1, d]

    def start(self, num_tokens: int) -> None:
        self._tokens = num_tokens
        self._layers = [None] * self.num_layers
        self._seen = [False] * self.num_layers

    def _buffered(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._tokens > self.buffer_tokens:
            return None
        if self._buffers is None or self._buffers[0].device != like.device:
            shape = (self.num_layers, self.buffer_tokens, like.shape[-1])
            self._buffers = (torch.empty(shape, device=like.device), torch.empty(shape, device=like.device))
        return self._buffers

    def observe(self, layer: int, mlp_out: torch.Tensor, residual: torch.Tensor) -> None:
        """One layer's MLP output and the residual stream it is added to, ``[N, d]`` each."""
        n = self._tokens
        buffers = self._buffered(mlp_out)
        if buffers is not None:
            torch.add(mlp_out[:n], residual[:n], out=buffers[0][layer, :n])
            buffers[1][layer, :n].copy_(mlp_out[:n])
        else:
            hidden = mlp_out[:n] + residual[:n]
            self._layers[layer] = layer_statistics(hidden, mlp_out[:n], self._reference(mlp_out.device)[layer],
                                                   unit_references=True)
        self._seen[layer] = True

    def _statistics(self) -> dict[str, np.ndarray] | None:
        if not all(self._seen):
            return None
        n = self._tokens
        if n <= self.buffer_tokens and self._buffers is not None:
            hidden, mlp = self._buffers[0][:, :n], self._buffers[1][:, :n]
            stats = layer_statistics(hidden, mlp, self._reference(hidden.device), unit_references=True)
            # [L, 1, N] dots -> [1, L, N], as stack_layers lays them out
            stats.hidden_dot = stats.hidden_dot.transpose(0, 1)
            stats.mlp_dot = stats.mlp_dot.transpose(0, 1)
            return to_arrays(stats)
        return stack_layers([s for s in self._layers if s is not None])

    def finish(self, positions: np.ndarray) -> list[tuple[int, SinkEvent]]:
        """``(column, event)`` for every flagged token of the step; columns index the N tokens."""
        stats = self._statistics()
        if stats is None:
            return []
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
