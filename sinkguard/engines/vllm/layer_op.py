"""``sinkguard::layer_output``: the registered op through which a compiled vLLM model hands each
decoder layer's MLP output and residual to sinkguard.

Python wrapped around a decoder layer is traced once by torch.compile and frozen; a registered op
is not: Dynamo records the call, Inductor emits a call to the op, and the op's implementation runs
at every forward with the step's live tensors. So the compiled graph calls the same handler the
eager wrappers call (``VllmSinkRuntime._on_layer``: planned MLP edits, then the detector's capture).

- The op declares that it mutates ``mlp_out`` (MLP interventions edit it in place); functionalisation
  therefore orders every later reader of the layer's output after it, and the op cannot be
  dead-code eliminated although it returns nothing.
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
OP_NAME = "layer_output"
QUALIFIED_NAME = f"{OP_NAMESPACE}::{OP_NAME}"

LayerHandler = Callable[[int, torch.Tensor, torch.Tensor], None]

_handler: LayerHandler | None = None
_library: torch.library.Library | None = None


def set_handler(handler: LayerHandler | None) -> None:
    """The function the op calls with ``(layer, mlp_out, residual)``; None makes the op a no-op."""
    global _handler
    _handler = handler


def _layer_output(mlp_out: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    handler = _handler
    if handler is not None:
        handler(layer, mlp_out, residual)


def _layer_output_fake(mlp_out: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


def after_layer(forward: Callable[..., Any], index: int, op: Callable[..., None]) -> Callable[..., Any]:
    """A decoder layer's ``forward`` followed by the op on its output (vLLM layers return the MLP output
    and the residual before it). It holds no Python state, so tracing it freezes nothing.

    Defined here rather than in ``runtime.py`` because Dynamo inlines it: vLLM's AOT compile cache lists
    every file Dynamo inlined and recompiles when one of them changes (``_verify_source_unchanged`` in
    ``vllm/compilation/decorators.py``). This small file changes only with the op itself; edits to the
    runtime would otherwise cost every server its warm start."""

    def traced_forward(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        op(output[0], output[1], index)
        return output

    return traced_forward


def register() -> Callable[..., None]:
    """Register the op once per process (for the current platform's dispatch key); returns it."""
    global _library
    if _library is None:
        from vllm.utils.torch_utils import direct_register_custom_op

        library = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
        direct_register_custom_op(OP_NAME, _layer_output, mutates_args=["mlp_out"], fake_impl=_layer_output_fake,
                                  target_lib=library)
        _library = library  # the op lives as long as its library object
    return getattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME)
