"""Online detection: per engine step, per request, engine independent.

An engine adapter feeds one step at a time: :meth:`StepDetector.observe` with each decoder
layer's output and MLP output for the N tokens of the step (all scheduled requests, prefill
chunks and decode tokens together), then :meth:`StepDetector.finish` with the tokens' absolute
positions. Every token passes through all layers within one step, so a token's whole flag
column, hence its birth layer, lifetime and kind, is known at the end of the step that processed
it: no state is carried across steps except what the caller keeps per request (the serving
layer's records, :mod:`sinkguard.serving.records`).

The reference is the profile's stored per-layer direction (the request's own first token may be
a prefix-cache hit or several steps in the past); the window and the median MLP norm come from
the profile too. The arithmetic is :func:`~sinkguard.core.detection.detect_columns`, the same
function the offline scanner uses.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from sinkguard.core.detection import SinkEvent, detect_columns
from sinkguard.core.profile import SinkProfile
from sinkguard.core.settings import DetectorConfig
from sinkguard.core.trace import (
    LayerStatistics,
    captured_statistics,
    chunked_layer_statistics,
    pair_statistics,
    stack_layers,
    unit_rows,
)

logger = logging.getLogger("sinkguard")


class StepDetector:
    """Detects sinks among the tokens of one engine step against a profile's reference.

    How a layer's activations are captured depends on the step's size, because on a CPU every
    torch op issued between two decoder layers costs tens of microseconds (the layer's weights
    have just flushed the caches) while a decode step is only tens of milliseconds:

    - small steps (decode; up to ``buffer_tokens`` tokens) keep *references* to each layer's MLP
      output and residual, no op at all, and reduce all layers at once at the end. This is only
      right if the engine never overwrites a layer's outputs in place later in the step (vLLM's
      GPU fused add+RMSNorm does exactly that), so the first ``verify_steps`` small steps, and one
      in every ``reverify_every`` after them, also copy the activations and compare (an engine
      may change kernels mid-run, e.g. per batch size); any difference, or two layers' outputs
      sharing memory, switches to copying for good;
    - in copy mode each layer's activations go side by side into a persistent
      ``[L, buffer_tokens, 2d]`` buffer with one ``torch.cat``;
    - large steps (prefill) reduce each layer as it comes, ``chunk_tokens`` tokens at a time, so
      the transient memory stays ``chunk_tokens x d`` floats.

    :meth:`allocate` creates the persistent buffer up front (an engine sizes its KV cache after
    the model loads, and must see this memory then).
    """

    def __init__(self, profile: SinkProfile, config: DetectorConfig | None = None, buffer_tokens: int = 256,
                 verify_steps: int = 8, reverify_every: int = 1024, chunk_tokens: int = 2048) -> None:
        self.config = config or profile.meta.detector
        self.num_layers = profile.model.num_layers
        self.references = profile.reference_hidden_tensor()  # [L, d] unit rows
        self.hidden_size = int(self.references.shape[-1])
        self.window = profile.window_mask()
        self.mlp_median = profile.median_mlp_norm
        self.hidden_median = profile.median_hidden_norm
        self.reference_position = profile.reference_position
        self.buffer_tokens = buffer_tokens
        self.zero_copy = True  # until the engine is seen to overwrite layer outputs in place
        self.verify_steps = verify_steps
        self.reverify_every = reverify_every
        self.chunk_tokens = chunk_tokens
        self.verifications = 0  # small steps whose zero-copy capture was compared with a copy
        self._small_steps = 0
        self.unscanned_steps = 0  # steps whose activations could not be trusted (reported, not guessed)
        self._tokens = 0
        self._observed = 0
        self._small = False
        self._copying = False
        # zero-copy mode: each layer's MLP output and residual, in layer order
        self._captured: list[torch.Tensor | None] = [None] * (2 * self.num_layers)
        self._layers: list[LayerStatistics | None] = [None] * self.num_layers  # per-layer reductions
        self._buffer: torch.Tensor | None = None  # [L, buffer_tokens, 2d]: MLP output | residual
        self._slots: list[torch.Tensor] = []  # this step's per-layer views of the buffer
        self._slots_by_size: dict[int, list[torch.Tensor]] = {}
        self._references_on: dict[torch.device, torch.Tensor] = {}
        self._reference_columns_on: dict[torch.device, torch.Tensor] = {}

    def _reference(self, device: torch.device) -> torch.Tensor:
        if device not in self._references_on:
            self._references_on[device] = unit_rows(self.references.to(device, torch.float32))[:, None, :]
        return self._references_on[device]  # [L, 1, d]

    def _reference_columns(self, device: torch.device) -> torch.Tensor:
        if device not in self._reference_columns_on:
            self._reference_columns_on[device] = self._reference(device).transpose(1, 2).contiguous()
        return self._reference_columns_on[device]  # [L, d, 1]

    def allocate(self, device: torch.device | str) -> int:
        """Create the persistent buffer on ``device`` now; returns its size in bytes."""
        self._buffer_slots(1, torch.device(device))
        return self.buffer_bytes

    @property
    def buffer_bytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()

    def start(self, num_tokens: int, device: torch.device | str = "cpu") -> None:
        """Begin a step of ``num_tokens`` tokens whose activations live on ``device``."""
        self._tokens = num_tokens
        self._observed = 0
        self._small = num_tokens <= self.buffer_tokens
        if self._small:
            self._small_steps += 1
        verify = self.verify_steps > 0 or self._small_steps % self.reverify_every == 0
        self._copying = self._small and (not self.zero_copy or verify)
        if self._copying:
            self._slots = self._buffer_slots(num_tokens, torch.device(device))

    def abandon(self) -> None:
        """Drop the current step's captures (after a fault): the step counts as unscanned, and the
        next :meth:`start` begins clean."""
        self.unscanned_steps += 1
        self._captured = [None] * (2 * self.num_layers)
        self._layers = [None] * self.num_layers
        self._observed = 0

    def _buffer_slots(self, num_tokens: int, device: torch.device) -> list[torch.Tensor]:
        # Views are cached per step size: decode steps repeat the same few sizes, and slicing 30
        # views anew every step would cost as much as the copies themselves.
        if self._buffer is None or self._buffer.device != device:
            shape = (self.num_layers, self.buffer_tokens, 2 * self.hidden_size)
            self._buffer = torch.empty(shape, device=device, dtype=torch.float32)
            self._slots_by_size.clear()
        slots = self._slots_by_size.get(num_tokens)
        if slots is None:
            if len(self._slots_by_size) >= 32:
                self._slots_by_size.clear()
            slots = self._slots_by_size[num_tokens] = [self._buffer[layer, :num_tokens]
                                                       for layer in range(self.num_layers)]
        return slots

    def observe(self, layer: int, mlp_out: torch.Tensor, residual: torch.Tensor) -> None:
        """One layer's MLP output and the residual stream it is added to, ``[N, d]`` each."""
        n = self._tokens
        if mlp_out.shape[0] != n:  # an engine may pad the batch
            mlp_out, residual = mlp_out[:n], residual[:n]
        if self._small:
            if self.zero_copy:
                self._captured[2 * layer] = mlp_out
                self._captured[2 * layer + 1] = residual
            if self._copying:
                torch.cat((mlp_out, residual), dim=-1, out=self._slots[layer])
        else:
            self._layers[layer] = chunked_layer_statistics(residual, mlp_out, self._reference(mlp_out.device)[layer],
                                                           self.chunk_tokens)
        self._observed += 1

    def _small_step_pair(self) -> torch.Tensor | None:
        """The step's activations as ``[L, 2, N, d]`` float32 (MLP output, residual), or None when
        the zero-copy references cannot be trusted."""
        num_layers, n, d = self.num_layers, self._tokens, self.hidden_size
        referenced = None
        if self.zero_copy:
            tensors = self._captured
            if len(set(map(torch.Tensor.data_ptr, tensors))) < len(tensors):  # an output's memory was reused
                self._stop_zero_copy("two layers' outputs share memory")
            else:
                referenced = torch.stack(tensors).view(num_layers, 2, n, d).float()
        if not self._copying:
            return referenced  # None after a failed check: the step goes unscanned
        copied = self._buffer[:, :n].view(num_layers, n, 2, d).transpose(1, 2).contiguous()
        if referenced is not None:
            self.verify_steps = max(self.verify_steps - 1, 0)
            self.verifications += 1
            if not torch.equal(referenced, copied):
                self._stop_zero_copy("a layer's outputs changed after the layer returned")
        return copied

    def _stop_zero_copy(self, why: str) -> None:
        logger.warning("sinkguard: %s; capturing activations by copy from now on", why)
        self.zero_copy = False

    def _statistics(self) -> dict[str, np.ndarray] | None:
        complete = self._observed == self.num_layers
        if not self._small:
            return stack_layers([s for s in self._layers if s is not None]) if complete else None
        pair = self._small_step_pair() if complete else None
        self._captured = [None] * (2 * self.num_layers)  # release the step's activations
        if pair is None:
            return None
        pair[:, 1] += pair[:, 0]  # residual + MLP output = the layer's output hidden state
        return pair_statistics(pair, self._reference_columns(pair.device))

    def finish(self, positions: np.ndarray) -> list[tuple[int, SinkEvent]] | None:
        """``(column, event)`` for every flagged token of the step (columns index the N tokens),
        or None when the step could not be scanned (incomplete, or untrustworthy activations)."""
        stats = self._statistics()
        if stats is None:
            self.unscanned_steps += 1
            return None
        return self.detect(stats, positions)

    def finish_captured(self, captured: torch.Tensor, positions: np.ndarray) -> list[tuple[int, SinkEvent]]:
        """:meth:`finish` for a step whose statistics the engine captured inside its model, ``[L, N, 4]``
        (:func:`~sinkguard.core.trace.captured_statistics`): no :meth:`start` / :meth:`observe` then."""
        return self.detect(captured_statistics(captured), positions)

    def detect(self, stats: dict[str, np.ndarray], positions: np.ndarray) -> list[tuple[int, SinkEvent]]:
        """The step's events from its statistics (``[L, N]`` norms, ``[1, L, N]`` cosines)."""
        positions = np.asarray(positions)
        columns = np.arange(positions.shape[0])
        events = detect_columns(
            stats["hidden_cos"][0], stats["mlp_norm"], stats["mlp_cos"][0], self.window, self.mlp_median,
            self.config, positions=columns, num_layers=self.num_layers,
            hidden_norm=stats["hidden_norm"], hidden_median=self.hidden_median,
        )
        out = []
        for event in events:
            column = event.position
            event.position = int(positions[column])
            event.is_reference = event.position == self.reference_position
            out.append((column, event))
        return out
