"""Attention interventions in a step: which queries, which heads, which sink keys; the same in both engines.

ACT (``attention_redistribution``) scales the attention a query gives to its request's
*secondary sinks*; ZeroTuning (``first_token_scaling``) the attention it gives to the *primary*
sink. The arithmetic is :func:`~sinkguard.core.redistribution.redistributed_attention` (stable
form, float32); this module decides what it acts on.

Which secondary sinks a query at layer ``l`` is steered away from: the request's tokens whose MLP
output fired the formation signal (:func:`~sinkguard.core.interventions.formation_rows`, the
profile's rule) at a forming layer *below* ``l`` -- in an earlier engine step (earlier prompt
chunks, earlier decode steps) or in this step (its forming layers run before layer ``l``'s
attention). A sink born at layer ``f`` is therefore targeted from layer ``f + 1`` on, for every
later query that can see it, whichever step computed it: prefill, chunked prefill and decode give
the same target sets. The primary sink (the profile's reference position) is never a secondary
target. :class:`SinkMemory` keeps these positions per request between steps; the formation
signal is read on the MLP output *before* any MLP edit of the same policy.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from sinkguard.core.attention import visible_keys
from sinkguard.core.interventions import AttentionRedistribution, FirstTokenScaling, formation_rows
from sinkguard.core.redistribution import redistributed_attention


@dataclass
class AttentionEdit:
    """One attention intervention at one layer over one request's queries in a step."""

    intervention: AttentionRedistribution | FirstTokenScaling
    policy: str
    request: int  # the request's index in the step
    key: Hashable  # the request's identity across steps (SinkMemory)
    start: int  # query rows [start, end) of the flattened batch (one request's tokens are consecutive)
    end: int
    first_position: int  # position of row ``start``


@dataclass
class Watch:
    """A request whose policy redistributes attention away from secondary sinks: its rows are checked
    against the formation signal at the forming layers."""

    request: int
    key: Hashable
    start: int
    end: int
    first_position: int


class SinkMemory:
    """Per request: positions flagged by the formation signal, with the lowest layer they were flagged at."""

    def __init__(self) -> None:
        self._born: dict[Hashable, dict[int, int]] = {}

    def flag(self, key: Hashable, positions: np.ndarray, layer: int) -> None:
        born = self._born.setdefault(key, {})
        for position in positions.tolist():
            if born.get(position, layer + 1) > layer:
                born[position] = layer

    def targets(self, key: Hashable, layer: int) -> np.ndarray:
        """Positions of the request's sinks born below ``layer`` (sorted)."""
        born = self._born.get(key)
        if not born:
            return np.empty(0, dtype=np.int64)
        return np.array(sorted(p for p, b in born.items() if b < layer), dtype=np.int64)

    def forget(self, key: Hashable) -> None:
        self._born.pop(key, None)

    def keys(self) -> list[Hashable]:
        return list(self._born)


def watch_formations(layer: int, mlp_out: torch.Tensor, watches: list[Watch], rule, memory: SinkMemory,
                     primary_position: int) -> None:
    """Remember the watched requests' tokens that the formation signal flags at ``layer`` (rows of
    ``mlp_out`` [N, d], read before any edit)."""
    for watch in watches:
        rows = mlp_out[watch.start:watch.end]
        mask = formation_rows(rows, rule.direction, rule.median_norm, rule.min_ratio, rule.cos_threshold)
        if bool(mask.any()):
            positions = watch.first_position + np.flatnonzero(mask.cpu().numpy())
            memory.flag(watch.key, positions[positions != primary_position], layer)


def edit_targets(edit: AttentionEdit, layer: int, memory: SinkMemory, primary_position: int) -> np.ndarray:
    """Key positions whose attention ``edit`` scales at ``layer``."""
    if isinstance(edit.intervention, FirstTokenScaling):
        return np.array([primary_position], dtype=np.int64)
    return memory.targets(edit.key, layer)


def kept_fraction(spec: AttentionRedistribution | FirstTokenScaling) -> float:
    return spec.gamma if isinstance(spec, FirstTokenScaling) else spec.beta


def edit_heads(spec: AttentionRedistribution | FirstTokenScaling, num_heads: int) -> list[int]:
    heads = list(range(num_heads)) if spec.heads is None else spec.heads
    if any(h >= num_heads for h in heads):
        raise ValueError(f"{spec.kind}: heads {heads} out of range for a layer with {num_heads} query heads")
    return heads


def redistribute(
    spec: AttentionRedistribution | FirstTokenScaling,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    target_positions: np.ndarray,
    scale: float,
    window: int | None,
    out: torch.Tensor,
) -> int:
    """Overwrite ``out`` [Q, H, D] (one request's attention output at one layer) on the edited heads of
    the queries that see a target key; returns how many queries changed.

    ``query`` [Q, H, D] (post-rotary, unscaled); ``keys`` / ``values`` [K, Hkv, D] at positions 0..K-1
    (the request's whole context so far); ``query_positions`` [Q]. ``scale`` is the layer's softmax scale.
    """
    if target_positions.size == 0:
        return 0
    key_positions = torch.arange(keys.shape[0], device=keys.device)
    targets = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
    inside = target_positions[target_positions < keys.shape[0]]
    targets[torch.from_numpy(inside).to(keys.device)] = True
    visible = visible_keys(query_positions.to(keys.device), key_positions, window)
    rows = (visible & targets[None]).any(dim=1).nonzero().flatten()
    if rows.numel() == 0:
        return 0
    heads = edit_heads(spec, query.shape[1])
    group = query.shape[1] // keys.shape[1]
    head_index = torch.tensor(heads, device=query.device)
    kv_index = head_index // group
    edited = redistributed_attention(query.index_select(0, rows).index_select(1, head_index),
                                     keys.index_select(1, kv_index), values.index_select(1, kv_index),
                                     visible.index_select(0, rows), targets, kept_fraction(spec), scale)
    block = out.index_select(0, rows)
    block[:, head_index] = edited.to(out.dtype)
    out.index_copy_(0, rows, block)
    return int(rows.numel())


def redistribute_probabilities(probs: torch.Tensor, targets: torch.Tensor, kept: float) -> torch.Tensor:
    """The same edit on explicit probabilities ``[..., K]`` (scans show the mass after the edit):
    targets keep ``kept`` of their mass, the rest goes to the other keys in proportion. The other
    keys' mass is summed, never formed as ``1 - A``."""
    on_target = probs * targets
    other = probs - on_target
    target_mass = on_target.sum(-1, keepdim=True)
    other_mass = other.sum(-1, keepdim=True)
    gain = torch.where(other_mass > 0, (other_mass + (1 - kept) * target_mass) / other_mass.clamp_min(1e-38),
                       torch.ones_like(other_mass))
    keep = torch.where(other_mass > 0, torch.full_like(other_mass, kept), torch.ones_like(other_mass))
    return on_target * keep + other * gain
