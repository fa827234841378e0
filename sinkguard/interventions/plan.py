"""Per-step intervention plans: built once per engine step, outside the model; read inside layers.

An engine step carries N tokens of several requests, each with its own policy. :func:`build_plan`
turns ``(request slices, policies)`` into, per layer, the edits to apply: which rows of the
flattened batch, which intervention, whether the formation signal still has to pick the rows
in the forward pass. Requests sharing a policy share one edit (their rows concatenated). Layer
code only reads the plan (:func:`edit_mlp_output` after a layer's MLP, :func:`apply_attention_edits`
after its attention kernel); an empty plan (no request with a policy)
costs one dict lookup per layer. The same plan object drives both engines: the transformers
adapter builds it for one sequence, the vLLM adapter for each continuous-batching step (and, in
compiled mode, the plan is what gets copied into persistent tables).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from sinkguard.interventions.attention_edits import (
    AttentionEdit,
    KeyReader,
    SinkMemory,
    Watch,
    edit_targets,
    redistribute_group,
    watch_formations,
)
from sinkguard.interventions.policy import Policy
from sinkguard.interventions.specs import (
    AttentionRedistribution,
    InterventionSpec,
    MlpProjectionRemoval,
    formation_rows,
    keep_finite,
)


@dataclass(frozen=True)
class RequestSlice:
    """One request's tokens in a step: rows ``[start, end)`` at positions ``first_position``..."""

    index: int  # the request's index in the step
    start: int
    end: int
    first_position: int
    prompt_tokens: int
    policy: Policy
    key: Hashable = 0  # the request's identity across steps (its engine request id)


@dataclass
class MlpEdit:
    """One MLP intervention at one layer over some rows of the step."""

    intervention: InterventionSpec
    policy: str
    rows: torch.Tensor  # long [n]: candidate rows of the flattened batch
    requests: np.ndarray  # int [n]: each row's request index (to record what fired)
    positions: np.ndarray  # int [n]
    flagged_only: bool  # the formation signal picks among the rows in the forward pass


@dataclass
class FormationRule:
    """The formation signal at one layer: MLP output >= ``min_ratio`` x the median token's and
    |cos| with the layer's sink direction >= ``cos_threshold``."""

    direction: torch.Tensor  # [d] unit
    median_norm: float
    min_ratio: float
    cos_threshold: float


@dataclass
class StepPlan:
    mlp: dict[int, list[MlpEdit]] = field(default_factory=dict)
    attention: dict[int, list[AttentionEdit]] = field(default_factory=dict)
    watches: list[Watch] = field(default_factory=list)
    """Requests whose secondary sinks are tracked (ACT): checked at ``watch_layers``."""
    watch_layers: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.mlp or self.attention or self.watches)


EMPTY_PLAN = StepPlan()


def _phase_rows(piece: RequestSlice, phases: list[str]) -> np.ndarray:
    """Rows of ``piece`` whose tokens are in ``phases`` (prefill: position < prompt length)."""
    rows = np.arange(piece.start, piece.end)
    positions = piece.first_position + (rows - piece.start)
    keep = np.zeros(rows.shape, dtype=bool)
    if "prefill" in phases:
        keep |= positions < piece.prompt_tokens
    if "decode" in phases:
        keep |= positions >= piece.prompt_tokens
    return rows[keep]


def build_plan(pieces: list[RequestSlice], forming_layers: list[int], reference_position: int = 0,
               num_layers: int | None = None) -> StepPlan:
    """The step's plan for requests ``pieces`` (requests without interventions add nothing). The
    primary sink (``reference_position``, the profile's reference) is never edited by an MLP edit: it
    forms at an early MLP too, and the formation signal would pick it. Attention edits without
    ``layers`` act in every layer (``num_layers``)."""
    grouped: dict[tuple[int, str, int], list[tuple[RequestSlice, np.ndarray]]] = {}
    specs: dict[tuple[int, str, int], InterventionSpec] = {}
    plan = StepPlan()
    for piece in pieces:
        for number, spec in enumerate(piece.policy.interventions):
            if spec.family == "attention":
                _plan_attention(plan, piece, spec, num_layers)
                continue
            rows = _phase_rows(piece, spec.phases)
            if rows.size == 0:
                continue
            for layer in spec.layers if spec.layers is not None else forming_layers:
                key = (layer, piece.policy.name, number)
                grouped.setdefault(key, []).append((piece, rows))
                specs[key] = spec
    if plan.watches:
        plan.watch_layers = frozenset(forming_layers)
    for key, parts in grouped.items():
        spec = specs[key]
        rows = np.concatenate([r for _, r in parts])
        requests = np.concatenate([np.full(r.shape, p.index) for p, r in parts])
        positions = np.concatenate([p.first_position + (r - p.start) for p, r in parts])
        all_tokens = isinstance(spec, MlpProjectionRemoval) and spec.tokens == "all_non_primary"
        keep = positions != reference_position
        rows, requests, positions = rows[keep], requests[keep], positions[keep]
        if rows.size == 0:
            continue
        plan.mlp.setdefault(key[0], []).append(MlpEdit(spec, key[1], torch.from_numpy(rows), requests, positions,
                                                       flagged_only=not all_tokens))
    return plan


def _plan_attention(plan: StepPlan, piece: RequestSlice, spec: InterventionSpec, num_layers: int | None) -> None:
    if isinstance(spec, AttentionRedistribution) and not any(w.request == piece.index for w in plan.watches):
        # its sinks are tracked whatever the phase: a prompt's sinks steer its decode steps
        plan.watches.append(Watch(piece.index, piece.key, piece.start, piece.end, piece.first_position))
    rows = _phase_rows(piece, spec.phases)  # consecutive: prefill rows precede decode rows
    if rows.size == 0:
        return
    if spec.layers is None and num_layers is None:
        raise ValueError(f"{spec.kind} without layers needs the model's number of layers")
    first_position = piece.first_position + int(rows[0]) - piece.start
    for layer in spec.layers if spec.layers is not None else range(num_layers):
        plan.attention.setdefault(layer, []).append(AttentionEdit(
            spec, piece.policy.name, piece.index, piece.key, int(rows[0]), int(rows[-1]) + 1, first_position))


@dataclass
class AppliedEdit:
    """What one edit did at one layer: the rows it changed (for records and metrics)."""

    layer: int
    intervention: InterventionSpec
    policy: str
    requests: np.ndarray
    positions: np.ndarray
    """MLP edits: the edited tokens; attention edits: the sink keys whose attention was scaled."""
    edited_rows: int = 0
    """Attention edits: the queries whose output changed (0 for MLP edits: one per position)."""
    nonfinite: np.ndarray | None = None
    """Request index of each token whose edit was skipped because its result was not finite (the
    token keeps its unedited value); None: none."""

    @property
    def count(self) -> int:
        """Token edits at this layer (the metric's unit)."""
        return self.edited_rows or len(self.positions)


def edit_mlp_output(layer: int, mlp_out: torch.Tensor, plan: StepPlan, rule: FormationRule, memory: SinkMemory,
                    reference_position: int) -> list[AppliedEdit]:
    """What both engines do with a layer's MLP output ``mlp_out`` [N, d]: remember the watched
    requests' newly formed sinks (read before any edit), then apply the planned MLP edits in place."""
    if layer in plan.watch_layers:
        watch_formations(layer, mlp_out, plan.watches, rule, memory, reference_position)
    return apply_mlp_edits(layer, mlp_out, plan, rule)


def apply_attention_edits(layer: int, plan: StepPlan, memory: SinkMemory, reference_position: int, scale: float,
                          window: int | None, query: torch.Tensor, out: torch.Tensor, read: KeyReader,
                          num_kv_heads: int) -> list[AppliedEdit]:
    """Apply the planned attention edits at ``layer`` to ``out`` [N, H, D] (the attention output of
    the step's queries ``query`` [N, H, D]). ``read(edits, kv_heads)`` gives the edited requests' keys
    and values the way their engine stores them; everything else is the same for both engines. Edits of
    one intervention with the same number of queries (e.g. every decode request) are computed in
    one batch."""
    edits = plan.attention.get(layer)
    if not edits:
        return []
    groups: dict[tuple[int, int], list[tuple[AttentionEdit, np.ndarray]]] = {}
    for edit in edits:
        targets = edit_targets(edit, layer, memory, reference_position)
        if targets.size:
            groups.setdefault((id(edit.intervention), edit.end - edit.start), []).append((edit, targets))
    applied = []
    for members in groups.values():
        group = [edit for edit, _ in members]
        changed, skipped = redistribute_group(group[0].intervention, group, [t for _, t in members], query, out,
                                              read, num_kv_heads, scale, window)
        for (edit, targets), count, bad in zip(members, changed, skipped):
            if count or bad:
                keys = targets if count else targets[:0]  # every query skipped: no key's attention was scaled
                applied.append(AppliedEdit(layer, edit.intervention, edit.policy, np.full(keys.shape, edit.request),
                                           keys, count, np.full(bad, edit.request) if bad else None))
    return applied


def apply_mlp_edits(layer: int, mlp_out: torch.Tensor, plan: StepPlan, rule: FormationRule) -> list[AppliedEdit]:
    """Edit ``mlp_out`` [N, d] in place at ``layer`` as planned; returns what fired. Computed in
    float32 and written back in the tensor's dtype."""
    edits = plan.mlp.get(layer)
    if not edits:
        return []
    applied = []
    for edit in edits:
        rows = edit.rows.to(mlp_out.device)
        chosen = mlp_out.index_select(0, rows).float()
        if edit.flagged_only:
            mask = formation_rows(chosen, rule.direction, rule.median_norm, rule.min_ratio, rule.cos_threshold)
            if not bool(mask.any()):
                continue
            rows, chosen = rows[mask], chosen[mask]
            picked = mask.cpu().numpy()
            requests, positions = edit.requests[picked], edit.positions[picked]
        else:
            requests, positions = edit.requests, edit.positions
        edited = edit.intervention.apply(chosen, rule.direction, rule.median_norm).to(mlp_out.dtype)
        edited, bad = keep_finite(edited, mlp_out.index_select(0, rows))
        mlp_out.index_copy_(0, rows, edited)
        nonfinite = None
        if bool(bad.any()):
            skipped = bad.cpu().numpy()
            nonfinite, requests, positions = requests[skipped], requests[~skipped], positions[~skipped]
        applied.append(AppliedEdit(layer, edit.intervention, edit.policy, requests, positions, nonfinite=nonfinite))
    return applied


def formation_rules(profile) -> list[FormationRule]:
    """Per layer, the formation signal a profile calibrated: its forming layers use their own alert
    ratio; other layers the detector's ``min_formation_ratio`` (3x at least)."""
    alerts = {f.layer: f.alert_mlp_norm_ratio for f in profile.meta.forming_layers}
    detector = profile.meta.detector
    directions = profile.reference_hidden_tensor().float()
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return [FormationRule(directions[layer], float(profile.median_mlp_norm[layer]),
                          alerts.get(layer, max(detector.min_formation_ratio, 3.0)), detector.cos_threshold)
            for layer in range(profile.model.num_layers)]
