"""vLLM adapter: observers around the worker's decoder layers that feed the engine-independent
online detector.

Installed by the plugin after the model runner has loaded the model (see ``plugin.py``). It only
translates: vLLM's decoder layers return ``(mlp_contribution, residual)`` for every family of
:mod:`sinkguard.architectures` (on Gemma the contribution is already post-normed, the same tensor
the transformers adapter hooks), whose sum is the residual stream the paper's detector reads; the
forward context says which rows of the flattened batch belong to which request. Detection,
per-request records and metrics are :mod:`sinkguard.core.online` and :mod:`sinkguard.metrics`.

Each decoder layer's ``forward`` is wrapped (an instance attribute, removed again by
:meth:`VllmSinkRuntime.remove`) rather than given a forward hook: with a hook installed, PyTorch
takes the slow path of ``Module.__call__``, which cost ~1.4% of a decode step on its own here
(30 layers, measured with no-op hooks), against ~0.4% for a wrapper.

Why it must run eagerly: Python code between layers does not run inside a torch.compile'd graph
or a captured CUDA graph (added after compilation it never runs; traced at compile time it
freezes), so the plugin refuses to start unless vLLM runs with ``enforce_eager=True``. The compiled-mode
design (a registered custom op writing into a persistent buffer) is in ``COMPILED_MODE.md`` next to
this file.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from sinkguard.architectures import contract_for_config, decoder_layers
from sinkguard.config import ServeConfig
from sinkguard.core.fingerprint import SAMPLE_SIZE, ModelInfo, model_info_from_config, module_identity
from sinkguard.core.online import StepDetector
from sinkguard.errors import ConfigError
from sinkguard.profile import SinkProfile
from sinkguard.serving.records import RequestTracker

logger = logging.getLogger("sinkguard")


def check_engine_settings(vllm_config: Any) -> None:
    """Refuse settings under which detection would be silently wrong."""
    model_config = vllm_config.model_config
    if not getattr(model_config, "enforce_eager", False):
        raise ConfigError(
            "sinkguard needs vLLM in eager mode: its detector runs as Python code between decoder layers, which "
            "does not run inside torch.compile graphs or CUDA graphs (detection would silently stop). Start vLLM with "
            "--enforce-eager (`sinkguard serve` sets it) or disable sinkguard (unset SINKGUARD_CONFIG)."
        )
    if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        raise ConfigError(
            "sinkguard cannot run with prefix caching: tokens served from the prefix cache skip the forward "
            "pass, so sinks among them would go undetected. Start vLLM with --no-enable-prefix-caching "
            "(`sinkguard serve` sets it)."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ConfigError("sinkguard does not support pipeline parallelism yet (tensor parallelism is fine): "
                          "set --pipeline-parallel-size 1")


def vllm_model_info(model: torch.nn.Module, hf_config: Any, name: str, sample_projections: bool = True) -> ModelInfo:
    """The loaded model's identity (see core.fingerprint). ``sample_projections``: True on tensor-parallel
    rank 0 only; other ranks hold other slices of the projections and are checked on their norms."""
    contract_for_config(hf_config)  # an architecture without a checked contract is refused by name
    layers = decoder_layers(model)
    if sample_projections:
        # The q rows lead each rank's fused qkv_proj and the gate rows its gate_up_proj; with fewer than
        # SAMPLE_SIZE of them per rank the slice would run into k or up rows, so such a model is not sampled.
        attn, mlp = getattr(layers[0], "self_attn", None), getattr(layers[0], "mlp", None)
        for fused in (getattr(attn, "qkv_proj", None), getattr(mlp, "gate_up_proj", None)):
            sizes = getattr(fused, "output_partition_sizes", None)
            if fused is not None and (not sizes or sizes[0] < SAMPLE_SIZE):
                sample_projections = False
    identity = module_identity(model.named_parameters(), sample_projections=sample_projections)
    architecture = (getattr(hf_config, "architectures", None) or [type(model).__name__])[0]
    return model_info_from_config(hf_config, architecture, name, identity, len(layers))


class VllmSinkRuntime:
    """The detector living in one vLLM worker."""

    def __init__(self, runner: Any, config: ServeConfig, profile: SinkProfile, record: bool = True) -> None:
        self.runner = runner
        self.config = config
        self.profile = profile
        self.record = record  # False on tensor-parallel ranks > 0: they see the same hidden states
        self.detector = StepDetector(profile)
        self.tracker = RequestTracker(config.max_finished_requests, config.max_events_per_request)
        self.model_name = config.model_name or profile.model.name
        self.metrics = None
        if config.metrics and record:
            from sinkguard.metrics import sink_metrics

            self.metrics = sink_metrics()
        self.steps = 0
        self.total_seconds = 0.0  # detector time (observers + detection), all steps
        self._active = False
        self._num_tokens = 0
        self._layout: tuple[np.ndarray, list[str]] | None = None
        self._input_ids: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._elapsed = 0.0
        self._wrapped: list[tuple[torch.nn.Module, Any]] = []  # (layer, its previous instance forward)

    # -- installation -------------------------------------------------------------------------
    def install(self) -> None:
        # vLLM's compile decorator replaces LlamaModel.__call__, so nothing around the model itself
        # runs even in eager mode; the decoder layers are plain modules. A step starts at the first
        # layer and ends with the last one.
        if self._wrapped:
            return
        layers = decoder_layers(self.runner.model)
        last = len(layers) - 1
        for index, layer in enumerate(layers):
            self._wrapped.append((layer, layer.__dict__.get("forward")))
            layer.forward = self._observed_forward(index, layer.forward, first=index == 0, last=index == last)

    def remove(self) -> None:
        for layer, previous in self._wrapped:
            if previous is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = previous
        self._wrapped.clear()
        self._active = False

    @property
    def installed(self) -> bool:
        return bool(self._wrapped)

    # -- observers ----------------------------------------------------------------------------
    def _batch_layout(self) -> tuple[np.ndarray, list[str]] | None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):  # micro-batching: one dict per micro-batch
            metadata = metadata[0] if len(metadata) == 1 else None
        if not metadata:  # profiling and warm-up runs have no metadata
            return None
        first = next(iter(metadata.values()))
        query_start = first.query_start_loc.cpu().numpy()
        num_requests = query_start.shape[0] - 1
        request_ids = list(self.runner.input_batch.req_ids[:num_requests])
        return query_start, request_ids

    def _on_step_start(self, args: tuple, kwargs: dict) -> None:
        start = time.perf_counter()
        layout = self._batch_layout()
        self._active = layout is not None
        if not self._active:
            return
        self._layout = layout
        self._num_tokens = int(layout[0][-1])
        # LlamaDecoderLayer.forward(positions, hidden_states, residual)
        self._positions = kwargs.get("positions", args[0] if args else None)
        self._input_ids = self.runner.input_ids.cpu
        self.tracker.retire_missing(self.runner.requests, on_retire=self._on_retire)
        self.detector.start(self._num_tokens, self._positions.device)
        self._elapsed = time.perf_counter() - start

    def _observed_forward(self, index: int, forward: Any, first: bool, last: bool) -> Any:
        observe = self.detector.observe  # runs for every layer of every step: keep it lean

        def observed_forward(*args: Any, **kwargs: Any) -> Any:
            if first:
                self._on_step_start(args, kwargs)
            output = forward(*args, **kwargs)
            if self._active:
                start = time.perf_counter()
                observe(index, output[0], output[1])  # vLLM layers return (mlp output, residual before it)
                self._elapsed += time.perf_counter() - start
                if last:
                    self._on_step_end()
            return output

        return observed_forward

    def _on_step_end(self) -> None:
        start = time.perf_counter()
        self._active = False
        n = self._num_tokens
        positions = self._positions[:n].cpu().numpy()
        events = self.detector.finish(positions)
        if self.record and events is not None:  # None: the step's activations were not usable
            self._record(positions, events)
        self._elapsed += time.perf_counter() - start
        self.steps += 1
        self.total_seconds += self._elapsed
        if self.metrics is not None:
            self.metrics.detector_seconds.labels(self.model_name).observe(self._elapsed)

    # -- bookkeeping --------------------------------------------------------------------------
    def _record(self, positions: np.ndarray, events: list) -> None:
        query_start, request_ids = self._layout
        live = self.tracker.live
        records = [live.get(request_id) or self._first_sight(request_id) for request_id in request_ids]
        # A request's tokens in a step are consecutive positions: those before its prompt's end
        # are prefill, the rest decode. Plain Python: a step has few requests, numpy calls cost more.
        starts = query_start.tolist()
        first_positions = positions[query_start[:-1]].tolist()
        step_prefill = step_decode = 0
        for i, record in enumerate(records):
            if record.options.detect:
                total = starts[i + 1] - starts[i]
                prefill = min(max(record.prompt_tokens - first_positions[i], 0), total)
                record.prefill_tokens_scanned += prefill
                record.prefill_steps += prefill > 0
                record.decode_tokens_scanned += total - prefill
                step_prefill += prefill
                step_decode += total - prefill
        if self.metrics is not None:
            if step_prefill:
                self.metrics.tokens_scanned.labels(self.model_name, "prefill").inc(step_prefill)
            if step_decode:
                self.metrics.tokens_scanned.labels(self.model_name, "decode").inc(step_decode)
        if not events:
            return
        token_ids = self._input_ids[: self._num_tokens].cpu().numpy() if self._input_ids is not None else None
        for column, event in events:
            i = int(np.searchsorted(query_start, column, side="right")) - 1
            record = records[i]
            if not record.options.detect:
                continue
            if token_ids is not None:
                event.token_id = int(token_ids[column])
            record.add(event, "prefill" if event.position < record.prompt_tokens else "decode")
            if self.metrics is not None and not event.is_reference:
                self.metrics.sinks_detected.labels(self.model_name, event.kind, str(event.birth_layer)).inc()

    def _first_sight(self, request_id: str) -> Any:
        """Open a record with the request's prompt length and options (once, not every step)."""
        state = self.runner.requests.get(request_id)
        prompt_len = len(state.prompt_token_ids or ()) if state is not None else 0
        extra = state.sampling_params.extra_args if state is not None and state.sampling_params else None
        return self.tracker.get(request_id, extra, prompt_len)

    def _on_retire(self, _record: Any) -> None:
        if self.metrics is not None:
            self.metrics.requests_finished.labels(self.model_name).inc()

    # -- control plane (collective_rpc) -------------------------------------------------------
    def lookup(self, request_id: str) -> list[dict[str, Any]]:
        self.tracker.retire_missing(self.runner.requests, on_retire=self._on_retire)
        return self.tracker.lookup(request_id)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.installed,
            "model": self.profile.model.name,
            "fingerprint": self.profile.model.fingerprint,
            "window_layers": self.profile.meta.window_layers,
            "forming_layers": [f.layer for f in self.profile.meta.forming_layers],
            "live_requests": len(self.tracker.live),
            "finished_requests": len(self.tracker.finished),
            "steps": self.steps,
            "unscanned_steps": self.detector.unscanned_steps,
            "zero_copy_capture": self.detector.zero_copy,
            "detector_seconds": round(self.total_seconds, 6),
        }
