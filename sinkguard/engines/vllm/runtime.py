"""vLLM adapter: observers around the worker's decoder layers that feed the engine-independent
online detector.

Installed by the plugin after the model runner has loaded the model (see ``plugin.py``). It only
translates: vLLM's decoder layers return ``(mlp_contribution, residual)`` for every family of
:mod:`sinkguard.engines.architectures` (on Gemma the contribution is already post-normed, the same tensor
the transformers adapter hooks), whose sum is the residual stream the paper's detector reads; the
runner's host-side batch structures say which rows of the flattened batch belong to which request, at
which positions (``batch_layout.py``, the same on every attention backend). Detection is
:mod:`sinkguard.core.online`; per-request records and their accounting (prefill, decode, recomputed
after a preemption, a cached prefix read back) are :mod:`sinkguard.serving.accounting`, which this
module feeds step by step; the fail-open guard is :mod:`sinkguard.serving.faults`; metrics
:mod:`sinkguard.serving.prometheus`. Engine settings it cannot observe are refused by ``refusals.py``.

A step starts and ends around the runner's ``_model_forward`` (Python outside the model in every
mode): the step's plan is built before the first layer and the detector reads the step's
captures after the last. In between, each decoder layer hands its MLP output and residual to
:meth:`VllmSinkRuntime._on_layer` (planned MLP edits, then capture):

- eagerly (``--enforce-eager``), through a wrapper around the layer's ``forward`` (an instance
  attribute, removed again by :meth:`VllmSinkRuntime.remove`) rather than a forward hook: with a
  hook installed, PyTorch takes the slow path of ``Module.__call__`` (~1.4% of a decode step here,
  against ~0.4% for a wrapper);
- compiled (vLLM's default; ``layer_op.py``, wrappers installed before vLLM compiles the model, so
  Dynamo traces them into the graph): the statistics are computed in the graph and copied into
  persistent buffers (no Python between layers for detection; the graph rounds bfloat16 as plain
  vLLM's does), and the step's end only queues their copy to the host (``host_copy.py``): they are read
  after sampling, or before the next step, so the host never waits for the device in the step
  (:class:`PendingStep`). With policies that decide per layer (``placement.py``), the registered op
  ``sinkguard::edit_mlp`` runs :meth:`VllmSinkRuntime._on_op` on each layer's MLP output first.

Attention edits wrap the attention implementation's ``forward``, which vLLM calls from its own
opaque attention op at run time in both modes (on GPU a splitting op, outside CUDA graphs); the
keys and values they recompute with are read from the paged cache by ``kv_cache.py``.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from sinkguard.core.fingerprint import SAMPLE_SIZE, ModelInfo, model_info_from_config, module_identity
from sinkguard.core.online import StepDetector
from sinkguard.core.profile import SinkProfile
from sinkguard.core.trace import unit_rows
from sinkguard.engines.architectures import contract_for_config, decoder_layers
from sinkguard.engines.vllm.batch_layout import BatchLayout, read_batch_layout
from sinkguard.engines.vllm.host_copy import HostStaging
from sinkguard.engines.vllm.kv_cache import attention_layers, attention_window
from sinkguard.engines.vllm.placement import placement
from sinkguard.engines.vllm.refusals import compiled_mode
from sinkguard.errors import ConfigError
from sinkguard.interventions.attention_edits import SinkMemory
from sinkguard.interventions.plan import (
    EMPTY_PLAN,
    AppliedEdit,
    RequestSlice,
    StepPlan,
    apply_attention_edits,
    build_plan,
    edit_mlp_output,
    formation_rules,
)
from sinkguard.interventions.policy import ModelScope, PolicySet
from sinkguard.serving.accounting import RequestAccounting, RequestStart
from sinkguard.serving.faults import FaultGuard, FaultInjector
from sinkguard.serving.prefix_events import PrefixEventStore
from sinkguard.serving.prefix_restore import PrefixRestore
from sinkguard.serving.records import RequestTracker
from sinkguard.serving.settings import ServeConfig

logger = logging.getLogger("sinkguard")


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


@dataclass(frozen=True)
class PendingStep:
    """An in-graph step whose statistics are on their way to the host (``host_copy.py``)."""

    layout: BatchLayout
    input_ids: torch.Tensor | None  # the runner's host buffer: unchanged until its next step is prepared
    seconds: float  # detector time spent on the step so far


class VllmSinkRuntime:
    """The detector living in one vLLM worker.

    Fail-open: every piece of detector work runs under :class:`~sinkguard.serving.faults.FaultGuard`
    (see there); the model's own forward is never wrapped in it, so a model error stays vLLM's.
    """

    def __init__(self, runner: Any, config: ServeConfig, profile: SinkProfile, record: bool = True,
                 policies: PolicySet | None = None) -> None:
        self.runner = runner
        self.config = config
        self.profile = profile
        self.record = record  # False on tensor-parallel ranks > 0: they see the same hidden states
        self.detector = StepDetector(profile, reverify_every=config.reverify_every_steps,
                                     chunk_tokens=config.prefill_chunk_tokens)
        self.model_name = config.model_name or profile.model.name
        self.metrics = None
        if config.metrics and record:
            from sinkguard.serving.prometheus import sink_metrics

            self.metrics = sink_metrics()
        self.policies = PolicySet() if policies is None else policies
        self.rules = formation_rules(profile)
        self.forming_layers = [f.layer for f in profile.meta.forming_layers]
        self.reference_position = profile.reference_position
        self.memory = SinkMemory()  # per request: its secondary sinks so far (attention edits target them)
        # attention implementations are wrapped only if some request may edit attention
        self.edits_attention = self.policies.allow_inline or any(
            spec.family == "attention" for p in self.policies.policies for spec in p.interventions)
        self._plan = EMPTY_PLAN
        self.guard = FaultGuard(config.fault_limit, config.fail_closed, on_fault=self._on_fault)
        self.injector = FaultInjector(config.fault_injection)
        self.removed_reason: str | None = None  # why the detector is off (removed itself, or switched off)
        self.steps = 0
        self.total_seconds = 0.0  # detector time (observers + detection), all steps
        self._active = False
        self._layout: BatchLayout | None = None
        self._input_ids: torch.Tensor | None = None
        self._device = torch.device("cpu")  # the model's, set at install
        self._elapsed = 0.0
        self._wrapped: list[tuple[Any, str, Any]] = []  # (object, attribute, its previous instance value)
        vllm_config = runner.vllm_config
        self.compiled = compiled_mode(vllm_config)
        # eager: Python wrappers; compiled: statistics captured in the graph, plus the edit op (layer_op)
        self.placement = placement(self.policies) if self.compiled else "eager"
        self._capture: list[torch.Tensor] | None = None  # compiled: per layer [max tokens per step, 4] float32
        self._staging: HostStaging | None = None  # compiled: the step's statistics on their way to the host
        self._pending: PendingStep | None = None  # compiled: the last step, until its statistics are read
        self._handler_calls = 0
        if self.placement == "in_graph" and self.injector.injection is not None \
                and self.injector.injection.stage == "layer":
            raise ConfigError("fault_injection.stage 'layer' needs Python between decoder layers, and this compiled "
                              "server without MLP or tracking policies runs none there (its statistics are captured "
                              "inside the graph): inject at step_start or step_end, or run with --enforce-eager")
        self._traced_layers = False  # compiled mode: the layers' op calls are part of the graph for good
        self._enabled = False
        prefix = None
        if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
            store = PrefixEventStore(int(vllm_config.cache_config.block_size), config.prefix_event_blocks)
            prefix = PrefixRestore(store, self.memory, self._token_ids)
        tracker = RequestTracker(config.max_finished_requests, config.max_events_per_request,
                                 config.record_store_bytes, config.record_ttl_seconds)
        self.accounting = RequestAccounting(tracker, self.policies, ModelScope.from_profile(profile), self.memory,
                                            self._describe, record=record, metrics=self.metrics,
                                            model_name=self.model_name, prefix=prefix)
        self._record_edits = self.accounting.applied  # bound once: called at every edited layer

    # -- installation -------------------------------------------------------------------------
    def install(self) -> None:
        """Install the step hooks and the layer hooks (compiled mode: before vLLM compiles the model,
        which happens at its first forward). Idempotent; :meth:`remove` undoes it."""
        if self._enabled:
            return
        layers = decoder_layers(self.runner.model)
        # The persistent buffer exists before vLLM measures memory and sizes the KV cache.
        self._device = next(self.runner.model.parameters()).device
        if self.compiled:
            if self._capture is None:  # never reallocated: a captured CUDA graph writes to their addresses
                tokens = int(getattr(self.runner, "max_num_tokens", 0) or self.runner.input_ids.cpu.shape[0])
                self._capture = [torch.zeros(tokens, 4, device=self._device, dtype=torch.float32) for _ in layers]
                self._staging = HostStaging(len(layers), tokens, self._device)
            # the step's statistics are read once they have landed: after sampling (vLLM's synchronous
            # scheduling has waited for the device by then), at the latest before the next step
            self._wrap(self.runner, "sample_tokens", self._sampled(self.runner.sample_tokens))
            self._wrap(self.runner, "execute_model", self._executed(self.runner.execute_model))
        else:
            self.detector.allocate(self._device)
        self._wrap(self.runner, "_model_forward", self._stepped_forward(self.runner._model_forward))
        if not self.compiled:
            for index, layer in enumerate(layers):
                self._wrap(layer, "forward", self._observed_forward(index, layer.forward))
        elif not self._traced_layers:
            self._trace_layers(layers)
        if self.edits_attention:  # only when a configured policy edits attention: otherwise no cost at all
            for index, attn in attention_layers(layers, self._attention_reason()):
                self._wrap(attn.impl, "forward", self._edited_attention(index, attn.impl.forward))
        if self.removed_reason is not None:  # reinstalled: requests that started meanwhile ran unobserved
            self.accounting.started_unobserved(self.runner.requests)
        self._enabled = True
        self.removed_reason = None
        self.guard.rearm()

    def _attention_reason(self) -> str:
        """The policies (or inline specs) that edit attention, as named in a refusal."""
        names = [p.name for p in self.policies.policies if any(s.family == "attention" for s in p.interventions)]
        parts = [f"polic{'ies' if len(names) > 1 else 'y'} {', '.join(names)}"] if names else []
        if self.policies.allow_inline:
            parts.append("allow_inline (a request may send an attention edit)")
        return "; ".join(parts)

    def _wrap(self, target: Any, attribute: str, replacement: Any) -> None:
        self._wrapped.append((target, attribute, target.__dict__.get(attribute)))
        setattr(target, attribute, replacement)

    @property
    def layer_calls(self) -> int:
        """Executions of sinkguard's ops in the compiled model (a graph without them is refused after
        warm-up). Under CUDA graphs the capture op's Python runs at capture only: still above zero."""
        from sinkguard.engines.vllm import layer_op

        return layer_op.capture_calls if self.placement == "in_graph" else self._handler_calls

    def _trace_layers(self, layers: list[torch.nn.Module]) -> None:
        """Compiled mode: each layer's forward is followed by the in-graph capture and, for policies that
        decide per layer, the edit op before it (``layer_op.py``). The wrappers hold no Python state, so
        tracing them freezes nothing; they stay for the process's life (the compiled graph runs them
        whether or not detection is on; off, the step hooks ignore what they capture)."""
        from sinkguard.engines.vllm import layer_op

        edit_op, capture_op = layer_op.register()
        if self.placement == "layer_op":
            layer_op.set_handler(self._on_op)
            compilation = self.runner.vllm_config.compilation_config
            cudagraphs = getattr(compilation, "cudagraph_mode", None)
            if cudagraphs is not None and cudagraphs.has_piecewise_cudagraphs():
                # piecewise CUDA graphs: the op runs Python, so it must split the graph (appended, not replacing
                # the user's list). A no-op on CPU, which captures no graphs.
                ops = compilation.splitting_ops if compilation.splitting_ops is not None else []
                if layer_op.QUALIFIED_NAME not in ops:
                    compilation.splitting_ops = [*ops, layer_op.QUALIFIED_NAME]
        else:
            edit_op = None
        for index, layer in enumerate(layers):
            direction = unit_rows(self.detector.references[index].to(self._device, torch.float32))
            layer.register_buffer(layer_op.DIRECTION_BUFFER, direction, persistent=False)
            layer.register_buffer(layer_op.STATISTICS_BUFFER, self._capture[index], persistent=False)
            layer.forward = layer_op.capturing_layer(layer.forward, index, capture_op, edit_op)
        self._traced_layers = True

    def remove(self, reason: str = "detection switched off by the operator") -> None:
        """Undo :meth:`install` (compiled mode: the op stays in the graph and does nothing). Requests
        running now, and those that start before a reinstall, lose their policies: their records say so."""
        self._finish_pending()
        self.accounting.interrupt(reason)
        self.removed_reason = reason
        for target, attribute, previous in reversed(self._wrapped):
            if previous is None:
                delattr(target, attribute)  # back to the class's attribute
            else:
                setattr(target, attribute, previous)
        self._wrapped.clear()
        self._enabled = False
        self._active = False

    @property
    def installed(self) -> bool:
        return self._enabled

    # -- observers ----------------------------------------------------------------------------
    def _stepped_forward(self, forward: Any) -> Any:
        """Wrap the runner's ``_model_forward``: a step's plan before the model, its detection after."""

        def stepped_forward(*args: Any, **kwargs: Any) -> Any:
            try:
                self._on_step_start()
            except Exception as exc:
                self._fault("step_start", exc)
            output = forward(*args, **kwargs)  # the model's own work: never guarded
            if self._active:
                try:
                    self._on_step_end()
                except Exception as exc:
                    self._fault("step_end", exc)
            return output

        return stepped_forward

    def _sampled(self, sample_tokens: Any) -> Any:
        """Wrap the runner's ``sample_tokens``: the step's captured statistics are read after it if they
        have landed (never waiting: with asynchronous scheduling they are read before the next step)."""

        def sample_then_detect(*args: Any, **kwargs: Any) -> Any:
            output = sample_tokens(*args, **kwargs)
            if self._pending is not None:
                self._finish_pending(wait=False)
            return output

        return sample_then_detect

    def _executed(self, execute_model: Any) -> Any:
        """Wrap the runner's ``execute_model``: a step still pending is read before the runner drops the
        requests that finished in it (their records must take their last step first)."""

        def detect_then_execute(*args: Any, **kwargs: Any) -> Any:
            if self._pending is not None:
                self._finish_pending()
            return execute_model(*args, **kwargs)

        return detect_then_execute

    def _on_step_start(self) -> None:
        if self._pending is not None:  # a runner that stepped without execute_model: read it now
            self._finish_pending()
        start = time.perf_counter()
        self._layout = None
        self._plan = EMPTY_PLAN
        self._active = False
        self.injector.step()
        layout = read_batch_layout(self.runner)
        if layout is None:
            return
        self._active = True
        self._layout = layout
        self.injector.maybe_raise("step_start")
        self._input_ids = self.runner.input_ids.cpu
        self.accounting.retire_missing(self.runner.requests)
        if not self.compiled:  # compiled: the graph captures the statistics
            self.detector.start(layout.num_tokens, self._device)
        self._plan = self._step_plan(layout)
        self._elapsed = time.perf_counter() - start

    def _step_plan(self, layout: BatchLayout) -> StepPlan:
        """The step's interventions, built before the first layer (a request without a policy costs
        a lookup; a step without any, nothing more)."""
        query_start, request_ids = layout.query_start, layout.request_ids
        records = self.accounting.records(request_ids)
        chosen = [(i, record) for i, record in enumerate(records) if record.interventions_policy is not None]
        if not chosen:
            return EMPTY_PLAN
        firsts = layout.first_positions
        pieces = [RequestSlice(i, int(query_start[i]), int(query_start[i + 1]), int(firsts[i]), record.prompt_tokens,
                               record.interventions_policy, request_ids[i]) for i, record in chosen]
        return build_plan(pieces, self.forming_layers, self.reference_position, len(self.rules))

    def _on_op(self, index: int, mlp_out: torch.Tensor) -> None:
        """The edit op's handler (compiled mode): counted, so a graph without the op is caught. The
        statistics are captured in the graph after it, from the edited output."""
        self._handler_calls += 1
        if self._active:
            self._on_layer(index, mlp_out)

    def _on_layer(self, index: int, mlp_out: torch.Tensor, residual: torch.Tensor | None = None) -> None:
        """One decoder layer's MLP output ``[N, d]``, edited in place as planned, and (eager) the residual
        it is added to, for the detector."""
        try:
            start = time.perf_counter()
            if self.injector.injection is not None:
                self.injector.maybe_raise("layer")
            if not self._plan.empty:  # edits land before the detector reads them
                self._record_edits(edit_mlp_output(index, mlp_out, self._plan, self.rules[index], self.memory,
                                                   self.reference_position), self._layout.request_ids)
            if residual is not None:
                self.detector.observe(index, mlp_out, residual)
            self._elapsed += time.perf_counter() - start
        except Exception as exc:
            self._fault("layer", exc)

    def _observed_forward(self, index: int, forward: Any) -> Any:
        on_layer = self._on_layer  # runs for every layer of every step: keep it lean

        def observed_forward(*args: Any, **kwargs: Any) -> Any:
            output = forward(*args, **kwargs)  # the model's own work: never guarded
            if self._active:
                on_layer(index, output[0], output[1])  # vLLM layers return (mlp output, residual before it)
            return output

        return observed_forward

    def _edited_attention(self, index: int, forward: Any) -> Any:
        """Wrap one attention implementation's ``forward``: after its kernel, the planned edits
        overwrite the edited heads of the edited requests' queries (float32, from the paged cache)."""
        inject = self.injector.maybe_raise if self.injector.injection is not None else None

        def edited_forward(layer: Any, query: torch.Tensor, key: Any, value: Any, kv_cache: torch.Tensor,
                           attn_metadata: Any, output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            result = forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if self._active and index in self._plan.attention and attn_metadata is not None:
                try:
                    start = time.perf_counter()
                    if inject is not None:
                        inject("intervention")
                    self._record_edits(self._attend(index, layer, query, kv_cache, attn_metadata, output),
                                       self._layout.request_ids)
                    self._elapsed += time.perf_counter() - start
                except Exception as exc:
                    self._fault("intervention", exc)
            return result

        return edited_forward

    def _attend(self, index: int, layer: Any, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any,
                output: torch.Tensor) -> list[AppliedEdit]:
        impl = layer.impl
        read = functools.partial(layer._sinkguard_reader.read_edits, kv_cache, metadata)  # the step's KV, per edit
        out = output.view(output.shape[0], impl.num_heads, -1)
        return apply_attention_edits(index, self._plan, self.memory, self.reference_position, impl.scale,
                                     attention_window(impl), query.view(query.shape[0], impl.num_heads, -1), out,
                                     read, impl.num_kv_heads)

    def _on_step_end(self) -> None:
        start = time.perf_counter()
        self._active = False
        self.injector.maybe_raise("step_end")
        layout = self._layout
        if self.compiled:  # captured inside the graph: read once on the host, not now
            self._staging.start(self._capture, layout.num_tokens)
            self._pending = PendingStep(layout, self._input_ids, self._elapsed + time.perf_counter() - start)
            return
        events = self.detector.finish(layout.positions)  # None: the step's activations were not usable
        self._account(layout, events, self._input_ids, self._elapsed + time.perf_counter() - start)

    def _finish_pending(self, wait: bool = True) -> None:
        """Detect and account the pending in-graph step (``wait`` False: only if its copy has landed)."""
        pending = self._pending
        if pending is None or not (wait or self._staging.ready()):
            return
        self._pending = None
        start = time.perf_counter()
        try:
            events = self.detector.finish_captured(self._staging.rows(), pending.layout.positions)
            self._account(pending.layout, events, pending.input_ids, pending.seconds + time.perf_counter() - start)
        except Exception as exc:
            self._layout = pending.layout  # the step whose requests go unscanned
            self._fault("step_end", exc)

    def _account(self, layout: BatchLayout, events: list | None, input_ids: torch.Tensor | None,
                 seconds: float) -> None:
        start = time.perf_counter()
        self.accounting.end_step(layout.query_start, layout.request_ids, layout.positions, events, input_ids)
        seconds += time.perf_counter() - start
        self.steps += 1
        self.total_seconds += seconds
        if self.metrics is not None:
            self.metrics.detector_seconds.labels(self.model_name).observe(seconds)

    # -- faults -------------------------------------------------------------------------------
    def _fault(self, stage: str, exc: Exception) -> None:
        """A detector fault: the step goes on unobserved (or, failing closed, the exception goes on)."""
        self._active = False
        self.detector.abandon()
        self._mark_unscanned()
        self.guard.record(stage, exc)  # re-raises when failing closed
        if self.guard.exhausted and self.installed:
            self.remove(f"removed after {self.guard.total} detector faults (first: {self.guard.first_fault}); "
                        "the server keeps serving without detection or interventions")
            logger.error("sinkguard: detector %s", self.removed_reason)

    def _on_fault(self, stage: str, _exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.faults.labels(self.model_name, stage).inc()

    def _mark_unscanned(self) -> None:
        try:  # best effort: the layout itself may be what failed
            if self._layout is not None:
                self.accounting.unscanned(self._layout.request_ids)
        except Exception:
            pass

    # -- what the engine knows of a request ---------------------------------------------------
    def _describe(self, request_id: str) -> RequestStart | None:
        state = self.runner.requests.get(request_id)
        if state is None:
            return None
        extra = state.sampling_params.extra_args if state.sampling_params else None
        return RequestStart(len(state.prompt_token_ids or ()), extra, state.num_computed_tokens)

    def _token_ids(self, request_id: str) -> list[int]:
        state = self.runner.requests[request_id]
        return [*(state.prompt_token_ids or ()), *state.output_token_ids]

    # -- control plane (collective_rpc) -------------------------------------------------------
    def lookup(self, client_id: str, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        self._finish_pending()
        self.accounting.retire_missing(self.runner.requests)
        return self.accounting.tracker.lookup(client_id, offset, limit)

    def summaries(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        self._finish_pending()
        self.accounting.retire_missing(self.runner.requests)
        return self.accounting.tracker.summaries(client_ids)

    def status(self) -> dict[str, Any]:
        self._finish_pending()
        tracker, prefix = self.accounting.tracker, self.accounting.prefix
        return {
            "runtime": True,
            "enabled": self.installed,
            "removed_reason": self.removed_reason,
            "model": self.profile.model.name,
            "fingerprint": self.profile.model.fingerprint,
            "window_layers": self.profile.meta.window_layers,
            "forming_layers": [f.layer for f in self.profile.meta.forming_layers],
            "live_requests": len(tracker.live),
            "finished_requests": len(tracker.finished),
            "finished_records_bytes": tracker.finished_bytes,
            "steps": self.steps,
            "unscanned_steps": self.detector.unscanned_steps,
            "faults": dict(self.guard.faults),
            "fail_closed": self.guard.fail_closed,
            "zero_copy_capture": None if self.compiled else self.detector.zero_copy,
            "zero_copy_verifications": self.detector.verifications,
            "persistent_buffer_bytes": self.detector.buffer_bytes + (
                sum(c.numel() * c.element_size() for c in self._capture or ()))
                + (self._staging.nbytes if self._staging is not None else 0),
            "detector_seconds": round(self.total_seconds, 6),
            "compiled": self.compiled,
            "capture": self.placement,
            "layer_op_calls": self.layer_calls,
            "prefix_events": prefix.store.stats() if prefix is not None else None,
        }
