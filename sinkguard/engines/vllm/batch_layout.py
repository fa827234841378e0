"""Which rows of a step's flattened batch belong to which request, at which positions: read from the
V1 model runner's own host-side structures, never from the attention backend's metadata (whose
fields differ per backend: FlashInfer's carries no ``query_start_loc``) and never from a device
tensor (no sync).

vLLM 0.32's ``GPUModelRunner._prepare_inputs`` (the CPU runner inherits it) fills, before the
model's forward: ``query_start_loc.np`` (the cumulative scheduled token counts, ``[num_reqs + 1]``),
``input_batch.req_ids`` (the requests in row order) and ``input_batch.num_computed_tokens_cpu``
(the tokens each request had before this step, prefix-cache hits included), and computes the
positions as ``num_computed_tokens_cpu[request] + offset within the request``, the same rule applied
here. ``_model_forward`` is called only from ``execute_model`` with scheduled tokens (dummy, profile
and capture runs call the model directly), so every call it sees is a real step. Checked against the
positions the runner hands the model in ``tests/vllm/test_compiled_mode.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BatchLayout:
    """One model step: request ``i`` owns rows ``query_start[i]:query_start[i + 1]``."""

    query_start: np.ndarray
    """``[R + 1]`` int64 row offsets."""
    request_ids: list[str]
    positions: np.ndarray
    """``[N]`` int64 absolute position of every row (prefix-cache hits and recomputation included)."""

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    @property
    def first_positions(self) -> np.ndarray:
        """``[R]`` the position of each request's first row in this step."""
        return self.positions[self.query_start[:-1]]


def read_batch_layout(runner: Any) -> BatchLayout | None:
    """The layout of the step the runner is about to run; None when it schedules no request."""
    batch = runner.input_batch
    num_requests = int(batch.num_reqs)
    if num_requests == 0:
        return None
    query_start = runner.query_start_loc.np[:num_requests + 1].astype(np.int64)  # a copy: the buffer is reused
    counts = np.diff(query_start)
    computed = batch.num_computed_tokens_cpu[:num_requests].astype(np.int64)
    positions = np.repeat(computed - query_start[:-1], counts) + np.arange(query_start[-1], dtype=np.int64)
    return BatchLayout(query_start, list(batch.req_ids[:num_requests]), positions)
