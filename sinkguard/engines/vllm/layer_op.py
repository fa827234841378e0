"""The registered ops through which a compiled vLLM model hands each decoder layer's activations to
sinkguard. Every compiled server captures the detector's statistics inside the graph; servers whose
policies decide per layer in Python add one op before the capture (placement: ``placement.py``):

- **In-graph capture** (every compiled server): :func:`capturing_layer` computes the detector's four
  per-token statistics (MLP output norm and its dot product with the layer's sink direction, the same
  for the layer's output hidden state) with plain tensor ops that Inductor fuses into the compiled
  graph, and ``sinkguard::capture_statistics`` copies them into the layer's persistent ``[T, 4]``
  buffer (a module buffer: a graph input the op mutates, which keeps it in the graph). No Python runs
  between layers for it, nothing splits the graph, and the model's own tensors are only read by
  fusable ops. Under CUDA graphs the copy is captured with the buffer's fixed address and replays
  with the graph.
- **The edit op** ``sinkguard::edit_mlp(Tensor(a!) mlp_out, int layer)`` (policies that edit MLP
  outputs or track sinks, which decide per step in Python): Python wrapped around a decoder layer is
  traced once and frozen; a registered op is not: Dynamo records the call, Inductor emits a call to
  the op, and the op's implementation runs at every forward with the step's live tensor. It calls
  ``VllmSinkRuntime._on_op`` (planned MLP edits in place, the tracked requests' new sinks), before
  the capture reads the edited output.

Where the model's tensors are read decides where Inductor rounds bfloat16 activations: an opaque op
that reads a layer's *residual* makes Inductor materialise it where plain vLLM's graph keeps the
fused float32 value, which changed bfloat16 outputs (28 of 50 prompts). The edit op therefore takes
the MLP output alone (a matmul's output, materialised in plain vLLM too) and the residual is read
only by the fusable capture: with or without the op, requests without edits get plain vLLM's tokens
(``tests/unit/test_capture_op.py``).

Of the edit op:

- It declares that it mutates ``mlp_out``: functionalisation orders every later reader of the
  layer's output (the capture, the next layer) after it, and the op cannot be dead-code eliminated
  although it returns nothing.
- One process holds one handler (one model per vLLM worker); without one (sinkguard switched off at
  run time, or a graph compiled with the op loaded by a process that never installed sinkguard) the
  op does nothing.
- On GPU under piecewise CUDA graphs the op must run outside the captured pieces: it is added to
  ``compilation_config.splitting_ops`` (``runtime.py``). Full CUDA graphs replay kernels and no
  Python: refused in ``refusals.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

OP_NAMESPACE = "sinkguard"
OP_NAME = "edit_mlp"
QUALIFIED_NAME = f"{OP_NAMESPACE}::{OP_NAME}"
CAPTURE_NAME = "capture_statistics"
QUALIFIED_CAPTURE_NAME = f"{OP_NAMESPACE}::{CAPTURE_NAME}"
DIRECTION_BUFFER = "sinkguard_direction"  # each decoder layer's unit sink direction [d] float32
STATISTICS_BUFFER = "sinkguard_statistics"  # each decoder layer's captured statistics [T, 4] float32
STATISTICS = ("mlp_norm", "mlp_dot", "hidden_norm", "hidden_dot")  # the capture's columns, in order

LayerHandler = Callable[[int, torch.Tensor], None]

_handler: LayerHandler | None = None
_library: torch.library.Library | None = None
capture_calls = 0  # op executions in this process (a compiled graph without them is refused after warm-up)


def set_handler(handler: LayerHandler | None) -> None:
    """The function the edit op calls with ``(layer, mlp_out)``; None makes the op a no-op."""
    global _handler
    _handler = handler


def _edit_mlp(mlp_out: torch.Tensor, layer: int) -> None:
    handler = _handler
    if handler is not None:
        handler(layer, mlp_out)


def _edit_mlp_fake(mlp_out: torch.Tensor, layer: int) -> None:
    return None


def _capture_statistics(stats: torch.Tensor, out: torch.Tensor) -> None:
    global capture_calls
    capture_calls += 1
    out[:stats.shape[0]].copy_(stats)


def _capture_statistics_fake(stats: torch.Tensor, out: torch.Tensor) -> None:
    return None


def layer_statistics(mlp_out: torch.Tensor, residual: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` float32 (:data:`STATISTICS`) of a layer's MLP output and output hidden state (residual
    + MLP output) against its unit sink direction ``[d]``: elementwise products and sums only, which
    Inductor fuses into one reduction over the layer's outputs (no float32 ``[N, d]`` temporaries).
    The same quantities as :func:`sinkguard.core.trace.pair_statistics`, in float32."""
    mlp = mlp_out.float()
    hidden = mlp + residual.float()
    return torch.stack((mlp.square().sum(-1).sqrt(), (mlp * direction).sum(-1),
                        hidden.square().sum(-1).sqrt(), (hidden * direction).sum(-1)), dim=-1)


def capturing_layer(forward: Callable[..., Any], index: int, capture: Callable[..., None],
                    edit: Callable[..., None] | None = None) -> Callable[..., Any]:
    """A decoder layer's ``forward`` (vLLM layers return the MLP output and the residual before it),
    then the edit op on its MLP output (``edit``, None: no policy edits), then the in-graph capture of
    its statistics. The layer's sink direction and its statistics buffer are buffers of the layer
    module (:data:`DIRECTION_BUFFER`, :data:`STATISTICS_BUFFER`): vLLM's compiled graph and its AOT
    artifact take them as inputs like the weights, and a CUDA graph replays the copy into the buffer's
    fixed address. The wrapper holds no Python state, so tracing it freezes nothing.

    Defined here rather than in ``runtime.py`` because Dynamo inlines it: vLLM's AOT compile cache lists
    every file Dynamo inlined and recompiles when one of them changes (``_verify_source_unchanged`` in
    ``vllm/compilation/decorators.py``). This small file changes only with the ops themselves; edits to
    the runtime would otherwise cost every server its warm start."""
    layer = forward.__self__

    def traced_forward(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        if edit is not None:
            edit(output[0], index)
        capture(layer_statistics(output[0], output[1], getattr(layer, DIRECTION_BUFFER)),
                getattr(layer, STATISTICS_BUFFER))
        return output

    return traced_forward


def register() -> tuple[Callable[..., None], Callable[..., None]]:
    """Register the ops once per process (for the current platform's dispatch key); returns
    ``(edit_mlp, capture_statistics)``. The capture op mutates a graph input (the layer's buffer),
    which keeps it in the graph although it returns nothing."""
    global _library
    if _library is None:
        from vllm.utils.torch_utils import direct_register_custom_op

        library = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
        direct_register_custom_op(OP_NAME, _edit_mlp, mutates_args=["mlp_out"], fake_impl=_edit_mlp_fake,
                                  target_lib=library)
        direct_register_custom_op(CAPTURE_NAME, _capture_statistics, mutates_args=["out"],
                                  fake_impl=_capture_statistics_fake, target_lib=library)
        _library = library  # the ops live as long as their library object
    ops = getattr(torch.ops, OP_NAMESPACE)
    return getattr(ops, OP_NAME), getattr(ops, CAPTURE_NAME)
