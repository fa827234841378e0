"""Model identity: shapes plus a hash of the normalisation weights.

A profile is only valid for the weights it was calibrated on. The hash covers every RMSNorm /
LayerNorm weight because those are (a) different in any fine-tune, (b) small, and (c) stored
whole and under the same names by transformers and by vLLM, even under tensor parallelism
(where embeddings and projections are sharded or fused). So both engine adapters compute the
same fingerprint from their loaded modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelInfo:
    """Architecture and shapes of a model, plus its weight fingerprint."""

    name: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, other: ModelInfo) -> str | None:
        """Why ``other`` is not the same model, or None when it is."""
        for field in ("architecture", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "vocab_size"):
            if getattr(self, field) != getattr(other, field):
                return f"{field} differs: {getattr(self, field)} vs {getattr(other, field)}"
        if self.fingerprint != other.fingerprint:
            return (f"the weights differ (fingerprint {self.fingerprint[:16]} vs {other.fingerprint[:16]}): "
                    "same architecture, other weights")
        return None


def _canonical(name: str) -> str:
    # "model.layers.3.input_layernorm.weight" and "model.language_model.layers.3..." match.
    index = name.find("layers.")
    return name[index:] if index >= 0 else name.rsplit(".", 2)[-2] + ".weight"


def weights_fingerprint(norm_weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, weight in sorted(((_canonical(n), w) for n, w in norm_weights), key=lambda x: x[0]):
        digest.update(name.encode())
        digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_info_from_config(
    config: Any, architecture: str, name: str, norm_weights: Iterable[tuple[str, torch.Tensor]], num_layers: int
) -> ModelInfo:
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    return ModelInfo(
        name=name,
        architecture=architecture,
        model_type=str(getattr(text, "model_type", "")),
        num_layers=num_layers,
        hidden_size=int(text.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab_size=int(text.vocab_size),
        fingerprint=weights_fingerprint(norm_weights),
    )
