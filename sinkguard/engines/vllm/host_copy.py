"""A step's captured statistics on their way to the host without the host waiting for the device.

In-graph capture (``layer_op.py``) leaves each decoder layer's ``[T, 4]`` statistics in a persistent
device buffer. At the step's end :meth:`HostStaging.start` stacks the step's rows (one kernel) and
queues a non-blocking copy into pinned host memory, then records an event; the host goes on (vLLM
launches sampling) while the device finishes the forward and the copy. :meth:`HostStaging.ready`
asks the event without blocking, :meth:`HostStaging.rows` waits for it (by then, in vLLM's
synchronous scheduling, the sampler has already waited for the same stream, so it returns at once).

On a CPU there is no device to overlap with: the copy is synchronous and no event is recorded.
"""

from __future__ import annotations

import torch


class HostStaging:
    """One step's ``[L, T, 4]`` statistics, copied from ``device`` to (pinned) host memory."""

    def __init__(self, num_layers: int, max_tokens: int, device: torch.device) -> None:
        self.device = device
        accelerated = device.type != "cpu"
        # [T, L, 4]: a step's rows are then one contiguous block in both buffers (one copy)
        self._stacked = torch.empty(max_tokens, num_layers, 4, device=device, dtype=torch.float32)
        self.host = torch.empty(max_tokens, num_layers, 4, dtype=torch.float32, pin_memory=accelerated)
        self._event = torch.Event(device=device) if accelerated else None
        self._tokens = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.host.numel() * self.host.element_size()

    def start(self, layers: list[torch.Tensor], num_tokens: int) -> None:
        """Queue the copy of the first ``num_tokens`` rows of every layer's buffer; returns at once."""
        stacked = self._stacked[:num_tokens]
        torch.stack([buffer[:num_tokens] for buffer in layers], dim=1, out=stacked)
        self.host[:num_tokens].copy_(stacked, non_blocking=True)  # on a CPU an ordinary copy
        if self._event is not None:
            self._event.record()
        self._tokens = num_tokens

    def ready(self) -> bool:
        """Whether the queued copy has landed (never blocks)."""
        return self._event is None or self._event.query()

    def rows(self) -> torch.Tensor:
        """The copied statistics as ``[L, T, 4]`` (a host view, valid until the next :meth:`start`)."""
        if self._event is not None:
            self._event.synchronize()
        return self.host[:self._tokens].transpose(0, 1)
