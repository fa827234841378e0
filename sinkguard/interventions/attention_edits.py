"""Attention interventions in a step: which queries, which heads, which sink keys; the same in both engines.

ACT (``attention_redistribution``) scales the attention a query gives to its request's
*secondary sinks*; ZeroTuning (``first_token_scaling``) the attention it gives to the *primary*
sink. The arithmetic is :func:`~sinkguard.interventions.redistribution.redistributed_attention` (stable
form, float32); this module decides what it acts on.

Which secondary sinks a query at layer ``l`` is steered away from: the request's tokens whose MLP
output fired the formation signal (:func:`~sinkguard.interventions.specs.formation_rows`, the
profile's rule) at a forming layer *below* ``l`` -- in an earlier engine step (earlier prompt
chunks, earlier decode steps) or in this step (its forming layers run before layer ``l``'s
attention). A sink born at layer ``f`` is therefore targeted from layer ``f + 1`` on, for every
later query that can see it, whichever step computed it: prefill, chunked prefill and decode give
the same target sets. The primary sink (the profile's reference position) is never a secondary
target. :class:`SinkMemory` keeps these positions per request between steps; the formation
signal is read on the MLP output *before* any MLP edit of the same policy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from sinkguard.interventions.redistribution import redistributed_attention
from sinkguard.interventions.specs import AttentionRedistribution, FirstTokenScaling, formation_rows, keep_finite


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
        self._arrays: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}  # (positions, birth layers), sorted

    def flag(self, key: Hashable, positions: np.ndarray, layer: int) -> None:
        born = self._born.setdefault(key, {})
        for position in positions.tolist():
            if born.get(position, layer + 1) > layer:
                born[position] = layer
                self._arrays.pop(key, None)

    def targets(self, key: Hashable, layer: int) -> np.ndarray:
        """Positions of the request's sinks born below ``layer`` (sorted)."""
        arrays = self._arrays.get(key)
        if arrays is None:
            born = self._born.get(key)
            if not born:
                return np.empty(0, dtype=np.int64)
            positions = np.array(sorted(born), dtype=np.int64)
            arrays = self._arrays[key] = (positions, np.array([born[p] for p in positions.tolist()]))
        positions, layers = arrays
        return positions[layers < layer]

    def born(self, key: Hashable) -> dict[int, int]:
        """The request's flagged positions and the lowest layer each was flagged at."""
        return self._born.get(key, {})

    def forget(self, key: Hashable) -> None:
        self._born.pop(key, None)
        self._arrays.pop(key, None)


def watch_formations(layer: int, mlp_out: torch.Tensor, watches: list[Watch], rule, memory: SinkMemory,
                     reference_position: int) -> None:
    """Remember the watched requests' tokens that the formation signal flags at ``layer`` (rows of
    ``mlp_out`` [N, d], read before any edit). One pass over all watched rows of the step."""
    spans = [np.arange(w.start, w.end) for w in watches]
    rows = np.concatenate(spans)
    mask = formation_rows(mlp_out.index_select(0, torch.from_numpy(rows).to(mlp_out.device)), rule.direction,
                          rule.median_norm, rule.min_ratio, rule.cos_threshold)
    if not bool(mask.any()):
        return
    hits = mask.cpu().numpy()
    start = 0
    for watch, span in zip(watches, spans):
        flagged = np.flatnonzero(hits[start:start + span.size])
        start += span.size
        if flagged.size:
            positions = watch.first_position + flagged
            memory.flag(watch.key, positions[positions != reference_position], layer)


def edit_targets(edit: AttentionEdit, layer: int, memory: SinkMemory, reference_position: int) -> np.ndarray:
    """Key positions whose attention ``edit`` scales at ``layer``."""
    if isinstance(edit.intervention, FirstTokenScaling):
        return np.array([reference_position], dtype=np.int64)
    return memory.targets(edit.key, layer)


def kept_fraction(spec: AttentionRedistribution | FirstTokenScaling) -> float:
    return spec.gamma if isinstance(spec, FirstTokenScaling) else spec.beta


def edit_heads(spec: AttentionRedistribution | FirstTokenScaling, num_heads: int) -> list[int]:
    heads = list(range(num_heads)) if spec.heads is None else spec.heads
    if any(h >= num_heads for h in heads):
        raise ValueError(f"{spec.kind}: heads {heads} out of range for a layer with {num_heads} query heads")
    return heads


KeyReader = Callable[[list[AttentionEdit], torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``read(edits, kv_heads) -> (keys [h, B, K, D], values [h, B, K, Dv], lengths [B])``: each edit's
request's whole context so far (positions 0..length-1, padded to K) on KV heads ``kv_heads``
(head-major), the way its engine stores it."""


def redistribute_group(
    spec: AttentionRedistribution | FirstTokenScaling,
    edits: list[AttentionEdit],
    targets: list[np.ndarray],
    query: torch.Tensor,
    out: torch.Tensor,
    read: KeyReader,
    num_kv_heads: int,
    scale: float,
    window: int | None,
) -> tuple[list[int], list[int]]:
    """Apply one intervention to several requests' queries at one layer in one batched computation.

    ``query`` / ``out`` [N, H, D]: the step's queries and attention output (flattened batch);
    ``edits[i]`` covers rows ``[start, end)``, ``targets[i]`` its sink key positions; only the KV heads
    the edited query heads read are fetched (``num_kv_heads``: the layer's). Overwrites the
    edited heads of the queries that see a target key; returns, per edit, how many queries changed
    and how many were left unedited because their result was not finite.
    """
    device = query.device
    width = max(e.end - e.start for e in edits)
    offsets = torch.arange(width, device=device)
    starts = torch.tensor([e.start for e in edits], device=device)
    counts = torch.tensor([e.end - e.start for e in edits], device=device)
    valid = offsets[None] < counts[:, None]  # [B, Q]
    rows = torch.where(valid, starts[:, None] + offsets[None], 0)
    positions = torch.tensor([e.first_position for e in edits], device=device)[:, None] + offsets[None]
    heads = torch.tensor(edit_heads(spec, query.shape[1]), device=device)
    keys, values, lengths = read(edits, heads // (query.shape[1] // num_kv_heads))  # [h', B, K, D]
    num_keys = keys.shape[2]
    key_positions = torch.arange(num_keys, device=device)
    marks = np.zeros((len(edits), num_keys), dtype=bool)
    for i, found in enumerate(targets):
        marks[i, found[found < num_keys]] = True
    target_mask = torch.from_numpy(marks).to(device)
    visible = ((key_positions[None, None] <= positions[..., None]) & valid[..., None]
               & (key_positions[None, None] < lengths.to(device)[:, None, None]))
    if window is not None:
        visible &= key_positions[None, None] > positions[..., None] - window
    changed = (visible & target_mask[:, None]).any(-1)  # [B, Q]: queries that see a target
    if not bool(changed.any()):
        return [0] * len(edits), [0] * len(edits)
    # heads lead as a batch dimension with one KV head each: [h', B, Q|K, 1, D]
    chosen = query[rows].index_select(2, heads).permute(2, 0, 1, 3).unsqueeze(-2)
    edited = redistributed_attention(chosen, keys.unsqueeze(-2), values.unsqueeze(-2), visible, target_mask,
                                     kept_fraction(spec), scale)[..., 0, :].permute(1, 2, 0, 3)  # [B, Q, h', D]
    flat_rows = rows[changed]
    original = out.index_select(0, flat_rows)
    block = original.clone()
    block[:, heads] = edited[changed].to(out.dtype)
    block, bad = keep_finite(block, original)
    out.index_copy_(0, flat_rows, block)
    if not bool(bad.any()):
        return changed.sum(1).tolist(), [0] * len(edits)
    skipped = torch.zeros_like(changed)
    skipped[changed] = bad
    return (changed & ~skipped).sum(1).tolist(), skipped.sum(1).tolist()


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
