"""Seeded requests with a chunked prefill on vLLM's CPU platform (a vLLM 0.32 bug, worked around).

A request with ``seed`` gets its own ``torch.Generator``. While its prompt is prefilled in chunks,
the model runner still samples a token for it after every chunk and throws that token away; to keep
the seeded output independent of the chunking it then rewinds the generator
(``gen.set_offset(gen.get_offset() - 4)`` in ``GPUModelRunner._bookkeeping_sync``). That only exists
for CUDA's Philox generators: a CPU generator raises ``CPU Generator does not use offset``, the
worker fails and the engine core dies, taking every in-flight request with it.

The workaround keeps the intent without rewinding: during ``sample_tokens`` of the CPU runner the
generators of requests whose sample will be discarded are taken out of the batch's generator map,
so those throw-away samples draw from the global generator instead and the request's own generator
is left untouched (which is what the rewind restores on GPU). Its first kept token is then drawn
from the generator's initial state, exactly as without chunking: same seed, same tokens. Installed
by the plugin in every vLLM process, on the CPU platform only.
"""

from __future__ import annotations

import functools
from typing import Any

_WRAPPED = "_sinkguard_cpu_seed"


def hidden_generators(runner: Any) -> dict[int, Any]:
    """Remove (and return) the generators of the batch rows whose sampled token is discarded."""
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    discarded = [int(i) for i in runner.discard_request_mask.np[:num_reqs].nonzero()[0]]
    return {i: generators.pop(i) for i in discarded if i in generators}


def _wrap_sample_tokens(runner_cls: type) -> None:
    original = runner_cls.sample_tokens
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_generators(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.input_batch.generators.update(hidden)  # the same dict the sampling metadata holds

    setattr(sample_tokens, _WRAPPED, True)
    runner_cls.sample_tokens = sample_tokens


def install() -> bool:
    """Patch vLLM's V1 CPU model runner on the CPU platform (idempotent); whether it applies here."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        return False
    _wrap_sample_tokens(CPUModelRunner)
    return True
