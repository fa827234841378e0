"""transformers adapter for interventions: MLP edits through forward hooks, planned per forward call.

Each forward call of the model is one "step" of one request: prefill (all prompt tokens) or a
decode step with a KV cache. A pre-hook on the first decoder layer builds the step's plan with
:func:`sinkguard.core.plan.build_plan` (positions continue from the tokens already seen), and a
hook on each layer's MLP output (the architecture contract's module) applies it with
:func:`~sinkguard.core.plan.apply_mlp_edits`, the same function the vLLM adapter calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sinkguard.architectures import mlp_output_module
from sinkguard.core.plan import AppliedEdit, RequestSlice, StepPlan, apply_mlp_edits, build_plan, formation_rules
from sinkguard.policy import Policy, refuse_unapplied


class HFIntervention:
    """The state of one request's run under a policy: its plan per call and what fired."""

    def __init__(self, policy: Policy, prompt_tokens: int, profile: Any) -> None:
        refuse_unapplied([policy])
        self.policy = policy
        self.prompt_tokens = prompt_tokens
        self.rules = formation_rules(profile)
        self.forming_layers = [f.layer for f in profile.meta.forming_layers]
        self.primary_position = profile.reference_position
        self.tokens_seen = 0
        self.plan = StepPlan()
        self.applied: list[AppliedEdit] = []

    def start(self, num_tokens: int) -> None:
        piece = RequestSlice(0, 0, num_tokens, self.tokens_seen, self.prompt_tokens, self.policy)
        self.plan = build_plan([piece], self.forming_layers, self.primary_position)
        self.tokens_seen += num_tokens

    def edit(self, layer: int, mlp_out: torch.Tensor) -> torch.Tensor:
        """``mlp_out`` [1, T, d] (or [T, d]) with the layer's planned edits applied."""
        flat = mlp_out.reshape(-1, mlp_out.shape[-1]).clone()
        self.applied += apply_mlp_edits(layer, flat, self.plan, self.rules[layer])
        return flat.view_as(mlp_out)


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
        yield state
    finally:
        for handle in handles:
            handle.remove()
