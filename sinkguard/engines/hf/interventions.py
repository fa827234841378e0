"""transformers adapter for interventions: MLP edits through forward hooks, attention edits inside
sinkguard's registered attention function; planned per forward call.

Each forward call of the model is one "step" of one request: prefill (all prompt tokens) or a
decode step with a KV cache. A pre-hook on the first decoder layer builds the step's plan with
:func:`sinkguard.interventions.plan.build_plan` (positions continue from the tokens already seen); a hook
on each layer's MLP output (the architecture contract's module) runs
:func:`~sinkguard.interventions.plan.edit_mlp_output`, and the attention function
(``engines/hf/attention.py``) runs :func:`~sinkguard.interventions.plan.apply_attention_edits` on its
output -- the same functions the vLLM adapter calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sinkguard.engines.architectures import mlp_output_module
from sinkguard.engines.hf.attention import intervening_attention
from sinkguard.interventions.attention_edits import (
    AttentionEdit,
    SinkMemory,
    edit_heads,
    edit_targets,
    kept_fraction,
    redistribute_probabilities,
)
from sinkguard.interventions.plan import (
    AppliedEdit,
    RequestSlice,
    StepPlan,
    apply_attention_edits,
    build_plan,
    edit_mlp_output,
    formation_rules,
)
from sinkguard.interventions.policy import ModelScope, Policy, check_scope


class HFIntervention:
    """The state of one request's run under a policy: its plan per call, its sinks, and what fired."""

    def __init__(self, policy: Policy, prompt_tokens: int, profile: Any) -> None:
        check_scope([policy], ModelScope.from_profile(profile))
        self.policy = policy
        self.prompt_tokens = prompt_tokens
        self.rules = formation_rules(profile)
        self.num_layers = profile.model.num_layers
        self.num_heads = profile.model.num_heads
        self.forming_layers = [f.layer for f in profile.meta.forming_layers]
        self.reference_position = profile.reference_position
        self.memory = SinkMemory()
        self.tokens_seen = 0
        self.plan = StepPlan()
        self.applied: list[AppliedEdit] = []

    def start(self, num_tokens: int) -> None:
        piece = RequestSlice(0, 0, num_tokens, self.tokens_seen, self.prompt_tokens, self.policy)
        self.plan = build_plan([piece], self.forming_layers, self.reference_position, self.num_layers)
        self.tokens_seen += num_tokens

    def edit(self, layer: int, mlp_out: torch.Tensor) -> torch.Tensor:
        """``mlp_out`` [1, T, d] (or [T, d]) with the layer's planned edits applied."""
        if self.plan.empty:
            return mlp_out
        flat = mlp_out.reshape(-1, mlp_out.shape[-1]).clone()
        self.applied += edit_mlp_output(layer, flat, self.plan, self.rules[layer], self.memory, self.reference_position)
        return flat.view_as(mlp_out)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
               scale: float, window: int | None) -> torch.Tensor:
        """``output`` [1, Q, H, D] of the layer's attention with the planned edits; ``query`` [1, H, Q, D],
        ``key``/``value`` [1, Hkv, K, D] (the whole context: positions 0..K-1, no padding)."""
        if layer not in self.plan.attention:
            return output
        out = output[0].clone()  # [Q, H, D]
        def read(edits: list[AttentionEdit], kv_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            count = len(edits)  # one request: [h, 1, K, D] for each of its edits
            keys, values = key[0, kv_heads, None], value[0, kv_heads, None]
            return keys.expand(-1, count, -1, -1), values.expand(-1, count, -1, -1), torch.full((count,), key.shape[2])

        self.applied += apply_attention_edits(layer, self.plan, self.memory, self.reference_position, scale, window,
                                              query[0].transpose(0, 1), out, read, key.shape[1])
        return out[None]

    def probability_transform(self, layer: int, window: int | None) -> Any:
        """For scans: the layer's edits on explicit attention probabilities, so the recorded sink mass
        is the mass after the edit (see :func:`~sinkguard.interventions.attention_edits.redistribute_probabilities`)."""
        edits = [(edit, edit_targets(edit, layer, self.memory, self.reference_position))
                 for edit in self.plan.attention.get(layer, [])]
        edits = [(edit, targets) for edit, targets in edits if targets.size]
        if not edits:
            return None

        def transform(probs: torch.Tensor, kv_head: int, query_start: int, query_end: int) -> torch.Tensor:
            group = probs.shape[1]
            key_start = 0 if window is None else max(0, query_start - window + 1)
            key_positions = torch.arange(key_start, query_end)
            query_rows = torch.arange(query_start, query_end)
            for edit, targets in edits:
                heads = [h - kv_head * group for h in edit_heads(edit.intervention, self.num_heads)
                         if kv_head * group <= h < (kv_head + 1) * group]
                rows = ((query_rows >= edit.start) & (query_rows < edit.end)).nonzero().flatten()
                if not heads or rows.numel() == 0:
                    continue
                hit = torch.isin(key_positions, torch.from_numpy(targets)).to(probs.dtype)
                chosen = probs[:, heads][:, :, rows]
                probs[:, heads, rows[0]:rows[-1] + 1] = redistribute_probabilities(
                    chosen, hit, kept_fraction(edit.intervention))
            return probs

        return transform


@contextmanager
def intervening(model: Any, policy: Policy, prompt_tokens: int, profile: Any) -> Iterator[HFIntervention]:
    """Apply ``policy`` to every forward call of ``model`` (an HFSinkModel) inside the block."""
    state = HFIntervention(policy, prompt_tokens, profile)
    layers = model.layers
    handles = []

    def on_first_layer(_module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        state.start(int(hidden.shape[-2]))

    def on_mlp(index: int):
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (state.edit(index, output[0]), *output[1:])
            return state.edit(index, output)

        return hook

    try:
        handles.append(layers[0].register_forward_pre_hook(on_first_layer, with_kwargs=True))
        for index, layer in enumerate(layers):
            handles.append(mlp_output_module(layer, model.contract).register_forward_hook(on_mlp(index)))
        with intervening_attention(state):
            yield state
    finally:
        for handle in handles:
            handle.remove()
