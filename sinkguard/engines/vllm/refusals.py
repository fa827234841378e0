"""Engine settings under which sinkguard's records would be silently wrong, refused at start-up.

vLLM's defaults are accepted: compiled mode (the per-layer work is inside the compiled graph,
``layer_op.py``), full CUDA graphs for observe-only servers, piecewise CUDA graphs where a policy runs
Python inside the model (``placement.py``; the layer op splits the graph) and prefix caching
(cached blocks keep their events, ``sinkguard.serving.prefix_events``; policies never share cached KV,
``cache_salt.py``).

Each rule names the vLLM 0.32 setting, why it breaks the observer, and what to set instead. The
check runs in every worker before the weights load (``plugin.py``), against the worker's own
``VllmConfig``, so it sees the settings vLLM actually resolved (defaults included: async
scheduling and the V2 model runner are on by default on GPU), not only the flags a user typed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sinkguard.errors import ConfigError


@dataclass(frozen=True)
class Refusal:
    setting: str
    applies: Callable[[Any], bool]
    why: str
    fix: str


def compiled_mode(config: Any) -> bool:
    """Whether vLLM will run the model through torch.compile (any mode but NONE, not eager)."""
    if getattr(config.model_config, "enforce_eager", False):
        return False
    mode = getattr(config.compilation_config, "mode", None)
    return mode is not None and int(mode) != 0


def _full_cudagraphs(config: Any) -> bool:
    mode = getattr(config.compilation_config, "cudagraph_mode", None)
    return (not getattr(config.model_config, "enforce_eager", False) and mode is not None
            and hasattr(mode, "has_full_cudagraphs") and mode.has_full_cudagraphs())


def _breakable_cudagraphs(config: Any) -> bool:
    """vLLM's experimental breakable CUDA graphs (``VLLM_USE_BREAKABLE_CUDAGRAPH=1``, switched on by
    ``VLLM_BATCH_INVARIANT`` too, ``vllm/config/vllm.py``) set compile mode none and capture the eager
    model, Python wrappers included, into a graph that replays kernels only."""
    import os

    mode = getattr(config.compilation_config, "cudagraph_mode", None)
    return (os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH", "0") == "1"
            and not getattr(config.model_config, "enforce_eager", False)
            and mode is not None and getattr(mode, "name", "NONE") != "NONE")


def _kv_connector(config: Any) -> str | None:
    transfer = getattr(config, "kv_transfer_config", None)
    return getattr(transfer, "kv_connector", None) if transfer is not None else None


FULL_CUDAGRAPHS = "full CUDA graphs (compilation_config.cudagraph_mode)"


def full_cudagraph_refusal(python_in_model: Sequence[str] | None) -> Refusal:
    """Full CUDA graphs replay kernels and no Python. An observe-only compiled model runs none inside it
    (``placement.py``: the statistics are captured in-graph), so only what runs Python there is refused:
    ``python_in_model`` names it (None: not known, refused as if something did)."""
    who = ", ".join(python_in_model) if python_in_model else "sinkguard's eager layer wrappers"
    return Refusal(
        FULL_CUDAGRAPHS,
        lambda c: _full_cudagraphs(c) and (python_in_model is None or bool(python_in_model) or not compiled_mode(c)),
        f"a full CUDA graph replays kernels and runs no Python, and {who} run Python inside the model (MLP edits and "
        "sink tracking in sinkguard's layer op, attention edits around the attention kernel): they would not run in "
        "the steps it captures (vLLM's GPU default captures decode steps whole)",
        "serve policies that edit with piecewise CUDA graphs: -cc.cudagraph_mode=PIECEWISE (`sinkguard serve` sets "
        "it on GPU when a policy needs it), or --enforce-eager; an observe-only compiled server runs full CUDA graphs")


REFUSALS: tuple[Refusal, ...] = (
    Refusal("breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH)", _breakable_cudagraphs,
            "they capture the eager model with sinkguard's Python layer wrappers into a CUDA graph, and a replayed "
            "graph runs no Python: detection and interventions would silently stop after capture",
            "set VLLM_USE_BREAKABLE_CUDAGRAPH=0 (and leave VLLM_BATCH_INVARIANT unset, which switches it on), or "
            "--enforce-eager"),
    Refusal("the V2 model runner", lambda c: bool(getattr(c, "use_v2_model_runner", False)),
            "sinkguard observes vLLM's V1 model runner (its input batch and request states); vLLM 0.32 uses the V2 "
            "runner by default where Triton is available, and sinkguard does not observe it yet",
            "set VLLM_USE_V2_MODEL_RUNNER=0 in the server's environment (`sinkguard serve` sets it)"),
    Refusal("async scheduling", lambda c: bool(getattr(c.scheduler_config, "async_scheduling", False)),
            "with async scheduling the next step's decode token ids exist only on the device when the step runs, "
            "so recorded token ids would be stale",
            "start vLLM with --no-async-scheduling (`sinkguard serve` sets it)"),
    Refusal("speculative decoding", lambda c: getattr(c, "speculative_config", None) is not None,
            "draft tokens run through the target model and are rejected afterwards; the detector would record "
            "sinks in tokens the request never generated",
            "remove --speculative-config"),
    Refusal("KV connectors and KV offloading", lambda c: _kv_connector(c) is not None,
            "tokens whose KV cache arrives through a connector (disaggregated prefill, LMCache, CPU offloading) "
            "skip the forward pass and, unlike vLLM's own prefix cache, come without their sink events",
            "remove --kv-transfer-config / --kv-offloading-size"),
    Refusal("data parallelism", lambda c: c.parallel_config.data_parallel_size > 1,
            "each data-parallel engine keeps its own records, and a lookup reaches only one of them",
            "run one sinkguard server per replica behind your router (--data-parallel-size 1); tensor parallelism "
            "is supported"),
    Refusal("micro-batching", lambda c: bool(getattr(c.parallel_config, "use_ubatching", False)),
            "micro-batched steps (dual-batch overlap) split a step's tokens across interleaved forward passes",
            "remove --enable-dbo / --ubatch-size"),
    Refusal("pipeline parallelism", lambda c: c.parallel_config.pipeline_parallel_size > 1,
            "a pipeline stage sees only its own layers, and the detector reads all of them",
            "set --pipeline-parallel-size 1 (tensor parallelism is supported)"),
    Refusal("LoRA adapters", lambda c: getattr(c, "lora_config", None) is not None,
            "a request served with a LoRA adapter runs other weights than the ones the sink profile was calibrated "
            "on (a merged LoRA is checked by the weight fingerprint; per-request adapters are not)",
            "remove --enable-lora, or merge the adapter and calibrate a profile for the merged model"),
)


def refused_settings(vllm_config: Any, python_in_model: Sequence[str] | None = None) -> list[Refusal]:
    """The rules ``vllm_config`` breaks; ``python_in_model``: the configured policies that run Python inside
    the model (``placement.python_in_model``; None: unknown)."""
    rules = (full_cudagraph_refusal(python_in_model), *REFUSALS)
    return [rule for rule in rules if rule.applies(vllm_config)]


def check_engine_settings(vllm_config: Any, python_in_model: Sequence[str] | None = None) -> None:
    """Raise :class:`ConfigError` naming every setting that would make sinkguard's records wrong."""
    broken = refused_settings(vllm_config, python_in_model)
    if broken:
        raise ConfigError("sinkguard cannot observe this engine: " + "; ".join(
            f"[{rule.setting}] {rule.why}: {rule.fix}" for rule in broken
        ) + ". Or disable sinkguard (unset SINKGUARD_CONFIG).")
