"""Two workarounds for defects of vLLM 0.32's start-up that every sinkguard server hit. The
plugin installs them only when sinkguard is enabled; plain vLLM is left as it is.

**Every restart recompiled the model.** With torch >= 2.10 vLLM saves the compiled model as an AOT
artifact and loads it on the next start (``vllm/compilation/decorators.py``,
``_try_load_aot_compiled_fn``). The load ends with
``loaded_fn._artifacts.compiled_fn.finalize_loading(vllm_config)``, a method of vLLM's own
``VllmSerializableFunction`` (``vllm/compilation/caching.py``), which wraps graphs compiled by
vLLM's backend (``CompilationMode.VLLM_COMPILE``, the GPU default). The CPU platform compiles in
``DYNAMO_TRACE_ONCE`` mode with Inductor as a plain ``torch.compile`` backend
(``vllm/platforms/cpu.py``), whose artifact torch wraps in ``BundledAOTAutogradSerializableCallable``;
that class forwards unknown attributes to the compiled function, a plain Python function, so the call
raises ``AttributeError: 'function' object has no attribute 'finalize_loading'``. vLLM takes any
exception there for a bad cache, logs "Compiling model again due to a load failure" and compiles
from scratch. Plain vLLM CPU 0.32 does the same; neither sinkguard's op nor its cache marker is
involved. The artifact itself is sound: deserialising it already rebuilt the compiled function,
whose generated kernels load lazily on the first call (vLLM's warm-up), so there is nothing left to
finalize. :func:`allow_aot_reload` gives that class the missing method as a no-op.

**122 warnings per start.** vLLM's weight loader (``vllm/model_executor/models/utils.py``,
``AutoWeightsLoader._load_param``) warns for every weight whose stored dtype differs from the
parameter's, unless the conversion widens. sinkguard's model folders are float32 (the scanner and
calibration work in float32), and vLLM serves a float32 checkpoint in bfloat16 by default
(``--dtype auto``), so every weight loaded that way warned. float32 -> bfloat16 keeps the exponent
range and only rounds the mantissa: it is what the served dtype means, not a fault.
:func:`quiet_downcast_warnings` turns those warnings into one line per process; every other dtype
mismatch (float16's narrower range can overflow) still warns.
"""

from __future__ import annotations

import logging
from typing import Any

WEIGHT_LOADER_LOGGER = "vllm.model_executor.models.utils"
# vLLM 0.32's format string, matched exactly so that no other message is touched
DTYPE_WARNING = "Attempted to load weight %s with dtype %s into parameter with dtype %s"


def allow_aot_reload() -> bool:
    """Give torch's wrapper of stock Inductor artifacts the ``finalize_loading`` vLLM's AOT load calls
    (see the module's doc). Returns whether it was added: not where the wrapper already has one (a
    fixed vLLM or torch) or where torch has no AOT artifacts (vLLM then never loads one)."""
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as wrapper
    except ImportError:
        return False
    if hasattr(wrapper, "finalize_loading"):
        return False

    def finalize_loading(self: Any, vllm_config: Any) -> None:
        """Nothing to do: the deserialised artifact is complete, its kernels load on the first call."""

    wrapper.finalize_loading = finalize_loading
    return True


class _DowncastWarnings(logging.Filter):
    """Replaces vLLM's float32 -> bfloat16 weight-load warnings with one INFO line (the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        import torch

        args = record.args
        if record.msg != DTYPE_WARNING or not isinstance(args, tuple) or len(args) != 3:
            return True
        if (args[1], args[2]) != (torch.float32, torch.bfloat16):
            return True
        self.seen += 1
        if self.seen > 1:
            return False
        record.msg = ("sinkguard: loading float32 checkpoint weights into bfloat16 parameters (the served "
                      "dtype); vLLM's per-weight warnings about this rounding are not shown")
        record.args = ()
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_downcast_warnings() -> None:
    """Install the filter on vLLM's weight-loader logger (once per process)."""
    logger = logging.getLogger(WEIGHT_LOADER_LOGGER)
    if not any(isinstance(f, _DowncastWarnings) for f in logger.filters):
        logger.addFilter(_DowncastWarnings())
