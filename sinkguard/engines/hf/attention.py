"""transformers adapter for attention: a registered ``AttentionInterface`` implementation.

``attn_implementation="sinkguard"`` routes every attention layer through here. While an
:class:`AttentionRecorder` is active (a context variable, so concurrent scans do not mix), the
layer runs :func:`~sinkguard.core.attention.attention_with_received_mass` and hands the received
mass to the recorder; otherwise it defers to SDPA, so a model loaded this way behaves exactly
like a normal one outside a scan. While a policy is applied (``intervening_attention``, see
``engines/hf/interventions.py``) the layer's output gets the planned attention edits, and a scan
records the attention mass *after* them.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sinkguard.core.attention import (
    AttentionVariant,
    attention_with_received_mass,
    sink_scores_from_received,
    visible_keys,
)
from sinkguard.errors import ModelLoadError

ATTENTION_IMPLEMENTATION = "sinkguard"


class AttentionRecorder:
    """Collects per-layer, per-head sink scores ``[H, T]`` for one sequence."""

    def __init__(self, num_layers: int, min_votes: int, chunk: int) -> None:
        self.min_votes = min_votes
        self.chunk = chunk
        self.head_scores: list[torch.Tensor | None] = [None] * num_layers
        self.windows: list[int | None] = [None] * num_layers

    def record(self, layer: int, received: torch.Tensor, sliding_window: int | None = None) -> None:
        self.head_scores[layer] = sink_scores_from_received(received[0], self.min_votes, sliding_window)
        self.windows[layer] = sliding_window

    def stacked(self) -> torch.Tensor:
        missing = [i for i, s in enumerate(self.head_scores) if s is None]
        if missing:
            raise RuntimeError(f"attention was not recorded for layers {missing}")
        return torch.stack([s for s in self.head_scores if s is not None])


_active: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar(
    "sinkguard_attention_recorder", default=None
)
_intervention: contextvars.ContextVar[Any] = contextvars.ContextVar("sinkguard_attention_intervention", default=None)


@contextmanager
def _bound(variable: contextvars.ContextVar, value: Any) -> Iterator[Any]:
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)


def recording(recorder: AttentionRecorder) -> contextlib.AbstractContextManager[AttentionRecorder]:
    """Record every attention layer's sink scores into ``recorder`` inside the block."""
    return _bound(_active, recorder)


def intervening_attention(state: Any) -> contextlib.AbstractContextManager[Any]:
    """Route every attention call through ``state.attend`` (an HFIntervention) inside the block."""
    return _bound(_intervention, state)


# Keyword arguments that change which keys a query sees in ways the chunked path does not model.
_REFUSED_KWARGS = {
    "cu_seq_lens_q": "packed sequences", "cu_seq_lens_k": "packed sequences",
    "attention_chunk_size": "chunked local attention", "chunk_size": "chunked local attention",
}


def _additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, window: int | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """The additive float mask eager attention functions expect, from the boolean SDPA-style mask
    transformers built for this implementation (None when it left causality to the kernel)."""
    if mask is None:  # causal, aligned to the last key (decode with a cache), plus the window
        mask = visible_keys(torch.arange(q_len) + (k_len - q_len), torch.arange(k_len), window)[None, None]
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def refuse_unsupported(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """ModelLoadError naming what the exact chunked path cannot honour."""
    for name, what in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ModelLoadError(f"{type(module).__name__} passes `{name}` ({what}), which sinkguard's attention sink "
                                 "scores do not support; scan with --no-attention")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ModelLoadError(f"{type(module).__name__} is not causal attention; attention sinks need a causal decoder")


def attention_variant(module: torch.nn.Module, kwargs: dict[str, Any]) -> AttentionVariant:
    """The layer's sliding window, soft-capping and learned sink logits."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = getattr(module, "sinks", None)
    return AttentionVariant(
        sliding_window=int(window) if window else None,
        softcap=float(softcap) if softcap else None,
        sink_logits=sinks.detach() if isinstance(sinks, torch.Tensor) else None,
    )


def sinkguard_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    recorder = _active.get()
    variant = attention_variant(module, kwargs)
    state = _intervention.get()
    if state is not None and module.layer_idx in state.plan.attention:
        if variant.softcap is not None or variant.sink_logits is not None:
            raise ModelLoadError(f"{type(module).__name__} soft-caps its logits or has learned sink logits: "
                                 "sinkguard's attention interventions do not model them")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        output, weights = _attention(module, query, key, value, attention_mask, scaling, dropout, recorder, variant,
                                     state.probability_transform(module.layer_idx, variant.sliding_window),
                                     **kwargs)
        return state.attend(module.layer_idx, query, key, value, output, scale, variant.sliding_window), weights
    return _attention(module, query, key, value, attention_mask, scaling, dropout, recorder, variant, None, **kwargs)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None, dropout: float,
               recorder: AttentionRecorder | None, variant: AttentionVariant, transform: Any,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    if recorder is None or query.shape[2] != key.shape[2]:
        # Not scanning, or decoding with a cache: the model's own attention. SDPA cannot soft-cap
        # or add sink logits, so such layers run the eager function of their own modeling module.
        if variant.softcap is not None or variant.sink_logits is not None:
            eager = sys.modules[type(module).__module__].eager_attention_forward
            mask = _additive_mask(attention_mask, query.shape[2], key.shape[2], variant.sliding_window, query.dtype)
            return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    refuse_unsupported(module, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output, received = attention_with_received_mass(query, key, value, scale, chunk=recorder.chunk,
                                                    transform=transform, variant=variant, mask=attention_mask)
    recorder.record(module.layer_idx, received, variant.sliding_window)
    # transformers expects [B, T, H, d] from attention functions.
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, sinkguard_attention_forward)
# Without a registered mask function transformers builds no mask at all for a custom implementation
# (it assumes the kernel masks by itself): sliding-window layers would then see every key outside a
# scan. SDPA's mask function gives exactly what the SDPA fallback expects.
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
