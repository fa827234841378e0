"""The per-architecture contract both engines read: where the decoder layers are, and which tensor
is "the MLP output" that the detector measures and the MLP interventions edit.

The paper's formation signal is the vector a layer's MLP *adds to the residual stream*. Which
tensor that is differs between families: a Llama layer adds ``mlp(x)``; a Gemma 2/3 layer adds
``post_feedforward_layernorm(mlp(x))``. vLLM's decoder layers return that very contribution as the
first element of ``(mlp_contribution, residual)`` for every family listed here (the add happens in
the next layer's fused add+norm), so the vLLM adapter reads it from the layer's output, while the
transformers adapter hooks the submodule named by ``mlp_output``.

Only families whose layer structure was checked are listed; anything else is refused by name, not
guessed from the presence of an ``.mlp`` attribute (a parallel-residual or residual-scaled layer
has one too, and measuring it would be silently wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sinkguard.errors import ModelLoadError


@dataclass(frozen=True)
class ArchitectureContract:
    """How one family's decoder layer adds its MLP output to the residual stream."""

    family: str
    architectures: tuple[str, ...]
    """``config.architectures`` names (transformers and vLLM use the same ones)."""
    mlp_output: str = "mlp"
    """transformers: the decoder layer's submodule whose output is added to the residual stream."""
    verified_with: str = ""
    """What this entry was checked against (trained weights, or a random model of the family)."""


CONTRACTS: tuple[ArchitectureContract, ...] = (
    ArchitectureContract("llama", ("LlamaForCausalLM",), verified_with="SmolLM2-135M-Instruct (trained)"),
    ArchitectureContract("mistral", ("MistralForCausalLM",), verified_with="random-weight Mistral (sliding window)"),
    ArchitectureContract("qwen2", ("Qwen2ForCausalLM",), verified_with="random-weight Qwen2"),
    ArchitectureContract("qwen3", ("Qwen3ForCausalLM",), verified_with="random-weight Qwen3"),
    ArchitectureContract("gemma2", ("Gemma2ForCausalLM",), mlp_output="post_feedforward_layernorm",
                         verified_with="random-weight Gemma 2 (soft-capping, sliding window)"),
    ArchitectureContract("gemma3", ("Gemma3ForCausalLM",), mlp_output="post_feedforward_layernorm",
                         verified_with="Gemma 3 270M (trained, sliding window)"),
)
_BY_ARCHITECTURE = {name: contract for contract in CONTRACTS for name in contract.architectures}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def contract_for_config(config: Any) -> ArchitectureContract:
    """The contract of an HF config (its ``architectures[0]``), or ModelLoadError naming it."""
    names = list(getattr(config, "architectures", None) or [])
    architecture = names[0] if names else type(config).__name__
    contract = _BY_ARCHITECTURE.get(architecture)
    if contract is None:
        raise ModelLoadError(
            f"sinkguard does not support the architecture {architecture}: it measures the vector a decoder layer's MLP "
            f"adds to the residual stream, and knows where that is only for {', '.join(supported_architectures())}. "
            "Other layer structures (parallel attention/MLP, scaled residuals, post-norm without a pair output) would "
            "be measured wrongly, so they are refused rather than guessed."
        )
    text = getattr(config, "text_config", None) or config
    if getattr(text, "use_bidirectional_attention", False):
        raise ModelLoadError(f"{architecture} with use_bidirectional_attention=True is not a causal decoder; "
                             "attention sinks are defined for causal attention only")
    return contract


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a causal LM in either engine (``model.model.layers``; multimodal
    wrappers keep them at ``model.model.language_model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None and inner is not None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ModelLoadError(f"unsupported model {type(model).__name__}: no decoder layers at model.model.layers")
    return layers


def mlp_output_module(layer: Any, contract: ArchitectureContract) -> Any:
    """transformers: the submodule of ``layer`` whose output the layer adds to the residual stream."""
    module = getattr(layer, contract.mlp_output, None)
    if module is None:
        raise ModelLoadError(f"{type(layer).__name__} has no `{contract.mlp_output}`, which the {contract.family} "
                             "contract names as the MLP's residual contribution")
    return module
