"""transformers adapter: load a causal LM and record one sequence's trace, layer by layer.

Forward hooks on each decoder layer and its MLP reduce the layer's output to the statistics of
:func:`~sinkguard.core.trace.layer_statistics` as soon as it is produced, so the run never
holds more than one layer's ``T x hidden`` activations beyond what the model itself keeps.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sinkguard.core.fingerprint import ModelInfo, model_info_from_config, module_identity
from sinkguard.core.settings import AttentionConfig
from sinkguard.core.trace import LayerStatistics, SequenceTrace, layer_statistics, stack_layers
from sinkguard.engines.architectures import ArchitectureContract, contract_for_config, decoder_layers, mlp_output_module
from sinkguard.engines.hf.attention import ATTENTION_IMPLEMENTATION, AttentionRecorder, recording
from sinkguard.errors import InputError, ModelLoadError
from sinkguard.sources.models import ResolvedModel, resolve_model


@dataclass
class HFSinkModel:
    """A transformers causal LM prepared for sink scanning."""

    model: Any
    tokenizer: Any
    source: ResolvedModel
    info: ModelInfo
    contract: ArchitectureContract

    @classmethod
    def load(cls, spec: str | Path | None = None, dtype: torch.dtype = torch.float32) -> HFSinkModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = resolve_model(spec)
        try:
            config = AutoConfig.from_pretrained(source.path)
        except Exception as exc:
            raise ModelLoadError(f"cannot read the config of {source.path}: {exc}") from exc
        contract = contract_for_config(config)  # refuses unknown layer structures by name, before loading
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, attn_implementation=ATTENTION_IMPLEMENTATION
            )
        except ValueError as exc:
            if "Unrecognized" in str(exc) or "not supported" in str(exc):
                raise ModelLoadError(
                    f"unsupported architecture in {source.path} ({getattr(config, 'architectures', None)}): {exc}"
                ) from exc
            raise ModelLoadError(f"could not load model from {source.path}: {exc}") from exc
        except Exception as exc:  # corrupt safetensors, missing shards, ...
            raise ModelLoadError(f"could not load model from {source.path}: {exc}") from exc
        model.eval()
        layers = decoder_layers(model)
        mlp_output_module(layers[0], contract)
        identity = module_identity(model.named_parameters())  # norms + projection sample, see core.fingerprint
        info = model_info_from_config(model.config, type(model).__name__, source.name, identity, len(layers))
        return cls(model=model, tokenizer=tokenizer, source=source, info=info, contract=contract)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=True).input_ids)
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode_tokens(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in token_ids]

    @torch.inference_mode()
    def trace(
        self,
        token_ids: list[int],
        attention: AttentionConfig | None = None,
        reference_candidates: int = 3,
        reference_directions: torch.Tensor | None = None,
    ) -> SequenceTrace:
        """Run one sequence and return its per-layer statistics.

        ``reference_directions`` [L, d] (from a profile) replaces the per-prompt reference
        candidates (the first ``reference_candidates`` positions' own hidden states).
        """
        if len(token_ids) < 2:
            raise InputError("a prompt needs at least 2 tokens to have sinks")
        if len(token_ids) > self.context_length:
            raise InputError(
                f"prompt has {len(token_ids)} tokens, more than the model's context of {self.context_length}; "
                "shorten it or set max_tokens to truncate"
            )
        layers = self.layers
        num_refs = min(reference_candidates, len(token_ids))
        per_layer: list[LayerStatistics | None] = [None] * len(layers)
        ref_hidden: list[torch.Tensor | None] = [None] * len(layers)
        ref_mlp: list[torch.Tensor | None] = [None] * len(layers)
        mlp_outputs: dict[int, torch.Tensor] = {}

        def on_mlp(index: int):
            def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
                mlp_outputs[index] = output[0]

            return hook

        def on_layer(index: int):
            def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
                hidden = (output[0] if isinstance(output, tuple) else output)[0]
                mlp_out = mlp_outputs.pop(index)
                if reference_directions is not None:  # a profile's unit float32 directions
                    per_layer[index] = layer_statistics(hidden, mlp_out, reference_directions[index : index + 1],
                                                        unit_references=True)
                else:
                    per_layer[index] = layer_statistics(hidden, mlp_out, hidden[:num_refs])
                ref_hidden[index] = hidden[:num_refs].float().clone()
                ref_mlp[index] = mlp_out[:num_refs].float().clone()

            return hook

        handles = []
        try:
            for i, layer in enumerate(layers):
                # the contract's module: what the layer adds to the residual stream (post-norm'd on Gemma)
                handles.append(mlp_output_module(layer, self.contract).register_forward_hook(on_mlp(i)))
                handles.append(layer.register_forward_hook(on_layer(i)))
            input_ids = torch.tensor([token_ids], dtype=torch.long)
            recorder = None
            if attention is not None and attention.enabled:
                recorder = AttentionRecorder(len(layers), attention.min_votes, attention.query_chunk)
            with recording(recorder) if recorder is not None else nullcontext():
                self._forward(input_ids)
        finally:
            for handle in handles:
                handle.remove()
        stats = stack_layers([s for s in per_layer if s is not None])
        return SequenceTrace(
            token_ids=list(token_ids),
            ref_hidden=torch.stack(ref_hidden, dim=1).numpy(),  # type: ignore[arg-type]
            ref_mlp=torch.stack(ref_mlp, dim=1).numpy(),  # type: ignore[arg-type]
            head_scores=recorder.stacked().numpy() if recorder is not None else None,
            attention_windows=list(recorder.windows) if recorder is not None else None,
            reference_from_profile=reference_directions is not None,
            **stats,
        )

    def _forward(self, input_ids: torch.Tensor) -> None:
        # Only the decoder stack is needed: skipping the LM head saves T x vocab floats.
        base = getattr(self.model, "model", self.model)
        base(input_ids=input_ids, use_cache=False)

