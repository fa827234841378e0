"""vLLM adapter: observers around the worker's decoder layers that feed the engine-independent
online detector.

Installed by the plugin after the model runner has loaded the model (see ``plugin.py``). It only
translates: vLLM's decoder layers return ``(mlp_contribution, residual)`` for every family of
:mod:`sinkguard.engines.architectures` (on Gemma the contribution is already post-normed, the same tensor
the transformers adapter hooks), whose sum is the residual stream the paper's detector reads; the
forward context says which rows of the flattened batch belong to which request. Detection is
:mod:`sinkguard.core.online`; per-request records, their accounting (prefill, decode, recomputed
after a preemption) and the fail-open guard are :mod:`sinkguard.serving`; metrics
:mod:`sinkguard.serving.prometheus`. Engine settings it cannot observe are refused by ``settings.py``.

A step starts and ends around the runner's ``_model_forward`` (Python outside the model in every
mode): the step's plan is built before the first layer and the detector reads the step's
captures after the last. In between, each decoder layer hands its MLP output and residual to
:meth:`VllmSinkRuntime._on_layer` (planned MLP edits, then capture):

- eagerly (``--enforce-eager``), through a wrapper around the layer's ``forward`` (an instance
  attribute, removed again by :meth:`VllmSinkRuntime.remove`) rather than a forward hook: with a
  hook installed, PyTorch takes the slow path of ``Module.__call__`` (~1.4% of a decode step here,
  against ~0.4% for a wrapper);
- compiled (vLLM's default), through the registered op ``sinkguard::layer_output``
  (``layer_op.py``): the wrapper is installed before vLLM compiles the model, so Dynamo traces the
  op call into the graph, and the op runs the handler at every forward. Inductor reuses
  intermediate buffers, so the detector captures by copy (never by reference) in this mode.

Attention edits wrap the attention implementation's ``forward``, which vLLM calls from its own
opaque attention op at run time in both modes (on GPU a splitting op, outside CUDA graphs).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from sinkguard.core.fingerprint import SAMPLE_SIZE, ModelInfo, model_info_from_config, module_identity
from sinkguard.core.online import StepDetector
from sinkguard.core.profile import SinkProfile
from sinkguard.engines.architectures import contract_for_config, decoder_layers
from sinkguard.engines.vllm.refusals import compiled_mode
from sinkguard.errors import ConfigError
from sinkguard.interventions.attention_edits import AttentionEdit, SinkMemory
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
from sinkguard.interventions.policy import NO_POLICY, ModelScope, PolicySet
from sinkguard.serving.faults import FaultGuard, FaultInjector
from sinkguard.serving.options import policy_cache_key
from sinkguard.serving.prefix_events import PrefixEventStore
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


def attention_window(impl: Any) -> int | None:
    """The layer's sliding window in sinkguard's convention (query i sees ``i - w < j <= i``): CPU
    backends store the window (-1: none), FlashAttention ``(w - 1, 0)`` (``(-1, -1)``: none)."""
    window = getattr(impl, "sliding_window", None)
    if isinstance(window, tuple):
        return window[0] + 1 if window[0] >= 0 else None
    return int(window) if window is not None and window > 0 else None


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
        self.tracker = RequestTracker(config.max_finished_requests, config.max_events_per_request,
                                      config.record_store_bytes, config.record_ttl_seconds)
        self.model_name = config.model_name or profile.model.name
        self.metrics = None
        if config.metrics and record:
            from sinkguard.serving.prometheus import sink_metrics

            self.metrics = sink_metrics()
        self.policies = PolicySet() if policies is None else policies
        self.rules = formation_rules(profile)
        self.forming_layers = [f.layer for f in profile.meta.forming_layers]
        self.reference_position = profile.reference_position
        self.scope = ModelScope.from_profile(profile)
        self.memory = SinkMemory()  # per request: its secondary sinks so far (attention edits target them)
        # attention implementations are wrapped only if some request may edit attention
        self.edits_attention = self.policies.allow_inline or any(
            spec.family == "attention" for p in self.policies.policies for spec in p.interventions)
        self._plan = EMPTY_PLAN
        self.guard = FaultGuard(config.fault_limit, config.fail_closed, on_fault=self._on_fault)
        self.injector = FaultInjector(config.fault_injection)
        self.removed_reason: str | None = None  # why the detector is off (removed itself, or switched off)
        self._started_unobserved: set[str] = set()  # requests that began while the detector was off
        self._warned_nonfinite = False
        self.steps = 0
        self.unlaid_steps = 0  # steps with attention metadata sinkguard could not map to requests
        self.total_seconds = 0.0  # detector time (observers + detection), all steps
        self._active = False
        self._num_tokens = 0
        self._layout: tuple[np.ndarray, list[str]] | None = None
        self._input_ids: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._elapsed = 0.0
        self._wrapped: list[tuple[Any, str, Any]] = []  # (object, attribute, its previous instance value)
        vllm_config = runner.vllm_config
        self.compiled = compiled_mode(vllm_config)
        self._traced_layers = False  # compiled mode: the layers' op calls are part of the graph for good
        self._enabled = False
        self.layer_calls = 0  # op calls seen (compiled mode): a graph without them is refused after warm-up
        self.prefix_store: PrefixEventStore | None = None
        self._prefix_missing: dict[str, list[int]] = {}  # cached blocks not in the store at the request's start
        if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
            self.prefix_store = PrefixEventStore(int(vllm_config.cache_config.block_size),
                                                 config.prefix_event_blocks)

    # -- installation -------------------------------------------------------------------------
    def install(self) -> None:
        """Install the step hooks and the layer hooks (compiled mode: before vLLM compiles the model,
        which happens at its first forward). Idempotent; :meth:`remove` undoes it."""
        if self._enabled:
            return
        layers = decoder_layers(self.runner.model)
        # The persistent buffer exists before vLLM measures memory and sizes the KV cache.
        self.detector.allocate(next(self.runner.model.parameters()).device)
        self._wrap(self.runner, "_model_forward", self._stepped_forward(self.runner._model_forward))
        if not self.compiled:
            for index, layer in enumerate(layers):
                self._wrap(layer, "forward", self._observed_forward(index, layer.forward))
        elif not self._traced_layers:
            self._trace_layers(layers)
        if self.edits_attention:  # only when a configured policy edits attention: otherwise no cost at all
            for index, attn in self._attention_layers(layers):
                self._wrap(attn.impl, "forward", self._edited_attention(index, attn.impl.forward))
        if self.removed_reason is not None:  # reinstalled: requests that started meanwhile ran unobserved
            self._started_unobserved = {r for r in self.runner.requests if r not in self.tracker.live}
        self._enabled = True
        self.removed_reason = None
        self.guard.rearm()

    def _wrap(self, target: Any, attribute: str, replacement: Any) -> None:
        self._wrapped.append((target, attribute, target.__dict__.get(attribute)))
        setattr(target, attribute, replacement)

    def _trace_layers(self, layers: list[torch.nn.Module]) -> None:
        """Compiled mode: each layer's forward calls the registered op after the layer's own work. The
        wrapper holds no Python state, so tracing it freezes nothing; it stays for the process's life
        (the compiled graph calls the op whether or not detection is on; off, the op returns at once)."""
        from sinkguard.engines.vllm import layer_op

        op = layer_op.register()
        layer_op.set_handler(self._on_op)
        self.detector.zero_copy = False  # Inductor reuses intermediate buffers within a step
        compilation = self.runner.vllm_config.compilation_config
        cudagraphs = getattr(compilation, "cudagraph_mode", None)
        if cudagraphs is not None and cudagraphs.has_piecewise_cudagraphs():
            # piecewise CUDA graphs: the op runs Python, so it must split the graph (appended, not replacing
            # the user's list). A no-op on CPU, which captures no graphs.
            ops = compilation.splitting_ops if compilation.splitting_ops is not None else []
            if layer_op.QUALIFIED_NAME not in ops:
                compilation.splitting_ops = [*ops, layer_op.QUALIFIED_NAME]
        for index, layer in enumerate(layers):
            # the wrapper lives in layer_op.py: Dynamo inlines it, and vLLM's compile cache is invalidated
            # by any change to a file Dynamo inlined (this one changes often)
            layer.forward = layer_op.after_layer(layer.forward, index, op)
        self._traced_layers = True

    def remove(self, reason: str = "detection switched off by the operator") -> None:
        """Undo :meth:`install` (compiled mode: the op stays in the graph and does nothing). Requests
        running now, and those that start before a reinstall, lose their policies: their records say so."""
        for record in self.tracker.live.values():
            record.policy_interrupted(reason)
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

    def _attention_layers(self, layers: list[torch.nn.Module]) -> list[tuple[int, Any]]:
        """Each decoder layer's vLLM attention module, checked for what attention edits can honour."""
        from vllm.model_executor.layers.attention.attention import Attention

        from sinkguard.engines.vllm.kv_cache import PagedKvReader

        found = []
        for index, layer in enumerate(layers):
            modules = [m for m in layer.modules() if isinstance(m, Attention)]
            if len(modules) != 1:
                raise ConfigError(f"attention interventions: decoder layer {index} has {len(modules)} vLLM attention "
                                  "modules, expected one")
            attn = modules[0]
            impl = attn.impl
            for name, unsupported in (("logits_soft_cap", bool(getattr(impl, "logits_soft_cap", 0) or 0)),
                                      ("sinks", getattr(impl, "sinks", None) is not None),
                                      ("alibi_slopes", getattr(impl, "alibi_slopes", None) is not None)):
                if unsupported:
                    raise ConfigError(f"attention interventions do not model {name} (layer {index}, "
                                      f"{type(impl).__name__}); remove attention_redistribution/first_token_scaling "
                                      "from the policies for this model")
            if getattr(attn, "_sinkguard_reader", None) is None:
                attn._sinkguard_reader = PagedKvReader(attn)
            found.append((index, attn))
        return found

    # -- observers ----------------------------------------------------------------------------
    def _batch_layout(self) -> tuple[np.ndarray, list[str]] | None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if not metadata:  # profiling and warm-up runs have no metadata
            return None
        if not isinstance(metadata, dict):  # e.g. a list per micro-batch: refused at start-up, never guessed
            self.unlaid_steps += 1
            raise TypeError(f"unexpected attention metadata {type(metadata).__name__}; cannot map tokens to requests")
        first = next(iter(metadata.values()))
        query_start = first.query_start_loc.cpu().numpy()
        num_requests = query_start.shape[0] - 1
        request_ids = list(self.runner.input_batch.req_ids[:num_requests])
        return query_start, request_ids

    def _stepped_forward(self, forward: Any) -> Any:
        """Wrap the runner's ``_model_forward``: a step's plan before the model, its detection after."""

        def stepped_forward(*args: Any, **kwargs: Any) -> Any:
            try:
                self._on_step_start(kwargs.get("positions"))
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

    def _on_step_start(self, positions: torch.Tensor | None) -> None:
        start = time.perf_counter()
        self._layout = None
        self._plan = EMPTY_PLAN
        self._active = False
        self.injector.step()
        layout = self._batch_layout()
        if layout is None or positions is None:
            return
        self._active = True
        self._layout = layout
        self.injector.maybe_raise("step_start")
        self._num_tokens = int(layout[0][-1])
        self._positions = positions
        self._input_ids = self.runner.input_ids.cpu
        self.tracker.retire_missing(self.runner.requests, on_retire=self._on_retire)
        self.detector.start(self._num_tokens, positions.device)
        self._plan = self._step_plan(layout)
        self._elapsed = time.perf_counter() - start

    def _step_plan(self, layout: tuple[np.ndarray, list[str]]) -> StepPlan:
        """The step's interventions, built before the first layer (a request without a policy costs
        a lookup; a step without any, nothing more)."""
        query_start, request_ids = layout
        live = self.tracker.live
        chosen = []
        for i, request_id in enumerate(request_ids):
            record = live.get(request_id) or self._first_sight(request_id)
            if record.interventions_policy is not None:
                chosen.append((i, record))
        if not chosen:
            return EMPTY_PLAN
        firsts = self._positions[torch.from_numpy(query_start[:-1]).to(self._positions.device)].tolist()
        pieces = [RequestSlice(i, int(query_start[i]), int(query_start[i + 1]), int(firsts[i]), record.prompt_tokens,
                               record.interventions_policy, request_ids[i]) for i, record in chosen]
        return build_plan(pieces, self.forming_layers, self.reference_position, len(self.rules))

    def _on_op(self, index: int, mlp_out: torch.Tensor, residual: torch.Tensor) -> None:
        """The registered op's handler (compiled mode): counted, so a graph without the op is caught."""
        self.layer_calls += 1
        if self._active:
            self._on_layer(index, mlp_out, residual)

    def _on_layer(self, index: int, mlp_out: torch.Tensor, residual: torch.Tensor) -> None:
        """One decoder layer's MLP output (edited in place as planned) and residual, ``[N, d]`` each."""
        try:
            start = time.perf_counter()
            if self.injector.injection is not None:
                self.injector.maybe_raise("layer")
            if not self._plan.empty:  # edits land before the detector reads them
                self._applied(edit_mlp_output(index, mlp_out, self._plan, self.rules[index], self.memory,
                                              self.reference_position))
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
                    self._applied(self._attend(index, layer, query, kv_cache, attn_metadata, output))
                    self._elapsed += time.perf_counter() - start
                except Exception as exc:
                    self._fault("intervention", exc)
            return result

        return edited_forward

    def _attend(self, index: int, layer: Any, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any,
                output: torch.Tensor) -> list[AppliedEdit]:
        impl = layer.impl
        reader = layer._sinkguard_reader

        def read(edits: list[AttentionEdit], kv_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            requests = torch.tensor([edit.request for edit in edits], device=metadata.block_table.device)
            return reader.read(kv_cache, metadata.block_table.index_select(0, requests),
                               metadata.seq_lens.index_select(0, requests.to(metadata.seq_lens.device)), kv_heads)

        out = output.view(output.shape[0], impl.num_heads, -1)
        return apply_attention_edits(index, self._plan, self.memory, self.reference_position, impl.scale,
                                     attention_window(impl), query.view(query.shape[0], impl.num_heads, -1), out,
                                     read, impl.num_kv_heads)

    def _on_step_end(self) -> None:
        start = time.perf_counter()
        self._active = False
        self.injector.maybe_raise("step_end")
        n = self._num_tokens
        positions = self._positions[:n].cpu().numpy()
        events = self.detector.finish(positions)
        if self.record:
            self._record(positions, events)  # events None: the step's activations were not usable
        if self.prefix_store is not None:  # every rank: attention edits read the restored formation flags
            self._commit_blocks(positions, scanned=events is not None)
        self._elapsed += time.perf_counter() - start
        self.steps += 1
        self.total_seconds += self._elapsed
        if self.metrics is not None:
            self.metrics.detector_seconds.labels(self.model_name).observe(self._elapsed)

    def _applied(self, applied: list[AppliedEdit]) -> None:
        request_ids = self._layout[1]
        for edit in applied:
            kind = edit.intervention.kind
            if edit.nonfinite is not None:
                self._skipped_nonfinite(edit, request_ids)
            if self.record:
                counts = [edit.count] + [0] * (len(edit.positions) - 1) if edit.edited_rows else None
                for n, (request, position) in enumerate(zip(edit.requests.tolist(), edit.positions.tolist())):
                    self.tracker.live[request_ids[request]].add_intervention(
                        kind, edit.layer, position, counts[n] if counts else 1)
            if self.metrics is not None:
                self.metrics.interventions_applied.labels(self.model_name, edit.policy, kind).inc(edit.count)

    def _skipped_nonfinite(self, edit: AppliedEdit, request_ids: list[str]) -> None:
        """Edits whose result was not finite were skipped (the tokens kept their values): counted and
        marked on the requests, never against ``fault_limit`` (one client's policy must not remove the
        detector for everyone)."""
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            logger.warning("sinkguard: %s (policy %s) at layer %d gave a non-finite result; the edit was skipped "
                           "for those tokens (counted in faults_total{stage=\"nonfinite_edit\"})",
                           edit.intervention.kind, edit.policy, edit.layer)
        if self.record:
            for request in edit.nonfinite.tolist():
                record = self.tracker.live[request_ids[request]]
                record.nonfinite_edits += 1
                record.policy_interrupted("an edit gave a non-finite result and was skipped")
        if self.metrics is not None:
            self.metrics.faults.labels(self.model_name, "nonfinite_edit").inc(len(edit.nonfinite))

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
            if self.record and self._layout is not None:
                for request_id in self._layout[1]:
                    record = self.tracker.live.get(request_id) or self._first_sight(request_id)
                    record.unscanned_steps += 1
                    record.policy_interrupted("a detector fault left a step without its interventions")
        except Exception:
            pass

    # -- bookkeeping --------------------------------------------------------------------------
    def _record(self, positions: np.ndarray, events: list | None) -> None:
        query_start, request_ids = self._layout
        live = self.tracker.live
        records = [live.get(request_id) or self._first_sight(request_id) for request_id in request_ids]
        # A request's tokens in a step are consecutive positions (RequestRecord.account splits
        # them into prefill, decode and recomputed). Plain Python: a step has few requests.
        starts = query_start.tolist()
        first_positions = positions[query_start[:-1]].tolist()
        scanned_below = [record.next_position for record in records]
        step_prefill = step_decode = 0
        for i, record in enumerate(records):
            if events is None:
                record.unscanned_steps += 1
                continue
            prefill, decode = record.account(first_positions[i], starts[i + 1] - starts[i])
            step_prefill += prefill
            step_decode += decode
        if self.metrics is not None:
            if step_prefill:
                self.metrics.tokens_scanned.labels(self.model_name, "prefill").inc(step_prefill)
            if step_decode:
                self.metrics.tokens_scanned.labels(self.model_name, "decode").inc(step_decode)
        if events:
            self._record_events(events, query_start, records, scanned_below)

    def _record_events(self, events: list, query_start: np.ndarray, records: list, scanned_below: list[int]) -> None:
        token_ids = self._input_ids[: self._num_tokens].cpu().numpy() if self._input_ids is not None else None
        store = self.prefix_store
        for column, event in events:
            i = int(np.searchsorted(query_start, column, side="right")) - 1
            record = records[i]
            if event.position < scanned_below[i]:
                continue  # recomputed after a preemption: recorded the first time
            if token_ids is not None:
                event.token_id = int(token_ids[column])
            if store is not None:
                store.add(record.request_id, (event,))  # whatever the request's options: the block's events
            if not record.options.detect:
                continue
            record.add(event, "prefill" if event.position < record.prompt_tokens else "decode")
            if self.metrics is not None and not event.is_reference:
                self.metrics.sinks_detected.labels(self.model_name, event.kind, str(event.birth_layer)).inc()

    # -- prefix caching -----------------------------------------------------------------------
    def _token_ids(self, request_id: str) -> list[int]:
        state = self.runner.requests[request_id]
        return [*(state.prompt_token_ids or ()), *state.output_token_ids]

    def _commit_blocks(self, positions: np.ndarray, scanned: bool) -> None:
        """Store the blocks this step completed, then read back cached blocks that were missing at the
        step's start (another request of the same step was computing them). After an unscanned step
        the step's requests store nothing more: their later blocks' events would be incomplete."""
        store = self.prefix_store
        query_start, request_ids = self._layout
        ends = (positions[query_start[1:] - 1] + 1).tolist()
        for request_id, upto in zip(request_ids, ends):
            if not scanned:
                store.forget(request_id)
            elif store.needs_commit(request_id, upto):
                store.commit(request_id, self._token_ids(request_id), upto,
                             tuple(self.memory.born(request_id).items()))
        for request_id in request_ids:
            missing = self._prefix_missing.pop(request_id, None)
            if missing:
                record = self.tracker.live[request_id]
                restored = self._restore(record, missing)
                record.cached_prefix_unknown_tokens += store.give_up(restored.missing)
                record.events.sort(key=lambda event: event["position"])  # the prefix's events lead, as in a recompute

    def _restore(self, record: Any, blocks: list[int]) -> Any:
        """Read the cached ``blocks`` of ``record``'s request back into its record and sink memory."""
        restored = self.prefix_store.restore(record.request_id, self._token_ids(record.request_id), blocks)
        if record.options.detect:
            for event in sorted(restored.events, key=lambda e: e.position):
                record.add(event, "prefill" if event.position < record.prompt_tokens else "decode")
        for position, layer in restored.formations:
            self.memory.flag(record.request_id, np.array([position]), layer)
        return restored

    def _cached_prefix(self, record: Any, cached_tokens: int) -> None:
        """A request that starts with ``cached_tokens`` tokens served from the prefix cache."""
        record.cached_prefix_tokens = cached_tokens
        record.next_position = cached_tokens  # not recomputed: read back
        full = cached_tokens // self.prefix_store.block_size
        record.cached_prefix_unknown_tokens = cached_tokens - full * self.prefix_store.block_size
        restored = self._restore(record, list(range(full)))
        if restored.missing:
            self._prefix_missing[record.request_id] = restored.missing

    def _first_sight(self, request_id: str) -> Any:
        """Open a record with the request's prompt length and options (once, not every step)."""
        state = self.runner.requests.get(request_id)
        prompt_len = len(state.prompt_token_ids or ()) if state is not None else 0
        extra = state.sampling_params.extra_args if state is not None and state.sampling_params else None
        record = self.tracker.get(request_id, extra, prompt_len)
        try:
            policy = record.options.resolved_policy(self.policies, self.scope)
        except ConfigError as exc:  # the API server answers 400; offline engines have no API server
            logger.warning("sinkguard: request %s is served without interventions: %s", request_id, exc)
            policy = self.policies.get(NO_POLICY)
        record.policy_name = policy.name
        record.interventions_policy = policy if policy.interventions else None  # None: nothing to plan
        if request_id in self._started_unobserved:
            self._started_unobserved.discard(request_id)
            record.policy_interrupted("detection was off when the request started")
        if self.prefix_store is not None and state is not None:
            self.prefix_store.begin(request_id, policy_cache_key(record.interventions_policy))
            if state.num_computed_tokens > 0:
                self._cached_prefix(record, state.num_computed_tokens)
        return record

    def _on_retire(self, record: Any) -> None:
        self.memory.forget(record.request_id)
        if self.prefix_store is not None:
            self.prefix_store.forget(record.request_id)
            self._prefix_missing.pop(record.request_id, None)
        if self.metrics is not None:
            self.metrics.requests_finished.labels(self.model_name).inc()

    # -- control plane (collective_rpc) -------------------------------------------------------
    def lookup(self, client_id: str, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        self.tracker.retire_missing(self.runner.requests, on_retire=self._on_retire)
        return self.tracker.lookup(client_id, offset, limit)

    def summaries(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        self.tracker.retire_missing(self.runner.requests, on_retire=self._on_retire)
        return self.tracker.summaries(client_ids)

    def status(self) -> dict[str, Any]:
        return {
            "runtime": True,
            "enabled": self.installed,
            "removed_reason": self.removed_reason,
            "model": self.profile.model.name,
            "fingerprint": self.profile.model.fingerprint,
            "window_layers": self.profile.meta.window_layers,
            "forming_layers": [f.layer for f in self.profile.meta.forming_layers],
            "live_requests": len(self.tracker.live),
            "finished_requests": len(self.tracker.finished),
            "finished_records_bytes": self.tracker.finished_bytes,
            "steps": self.steps,
            "unscanned_steps": self.detector.unscanned_steps,
            "faults": dict(self.guard.faults),
            "fail_closed": self.guard.fail_closed,
            "zero_copy_capture": self.detector.zero_copy,
            "zero_copy_verifications": self.detector.verifications,
            "persistent_buffer_bytes": self.detector.buffer_bytes,
            "detector_seconds": round(self.total_seconds, 6),
            "compiled": self.compiled,
            "layer_op_calls": self.layer_calls,
            "prefix_events": self.prefix_store.stats() if self.prefix_store is not None else None,
        }
