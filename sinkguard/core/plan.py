"""Per-step intervention plans: built once per engine step, outside the model; read inside layers.

An engine step carries N tokens of several requests, each with its own policy. :func:`build_plan`
turns ``(request slices, policies)`` into, per layer, the edits to apply: which rows of the
flattened batch, which intervention, whether the formation signal still has to pick the rows
in the forward pass. Requests sharing a policy share one edit (their rows concatenated). Layer
code only reads the plan (:func:`apply_mlp_edits`); an empty plan (no request with a policy)
costs one dict lookup per layer. The same plan object drives both engines: the transformers
adapter builds it for one sequence, the vLLM adapter for each continuous-batching step (and, in
compiled mode, the plan is what gets copied into persistent tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sinkguard.core.interventions import InterventionSpec, MlpProjectionRemoval, formation_rows
from sinkguard.policy import Policy


@dataclass(frozen=True)
class RequestSlice:
    """One request's tokens in a step: rows ``[start, end)`` at positions ``first_position``..."""

    index: int  # the request's index in the step
    start: int
    end: int
    first_position: int
    prompt_tokens: int
    policy: Policy


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

    @property
    def empty(self) -> bool:
        return not self.mlp


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


def build_plan(pieces: list[RequestSlice], forming_layers: list[int], primary_position: int = 0) -> StepPlan:
    """The step's plan for requests ``pieces`` (requests without interventions add nothing). The
    primary sink (``primary_position``, the profile's reference) is never edited: it forms at an
    early MLP too, and the formation signal would pick it."""
    grouped: dict[tuple[int, str, int], list[tuple[RequestSlice, np.ndarray]]] = {}
    specs: dict[tuple[int, str, int], InterventionSpec] = {}
    for piece in pieces:
        for number, spec in enumerate(piece.policy.interventions):
            if spec.family != "mlp":
                continue
            rows = _phase_rows(piece, spec.phases)
            if rows.size == 0:
                continue
            for layer in spec.layers if spec.layers is not None else forming_layers:
                key = (layer, piece.policy.name, number)
                grouped.setdefault(key, []).append((piece, rows))
                specs[key] = spec
    plan = StepPlan()
    for key, parts in grouped.items():
        spec = specs[key]
        rows = np.concatenate([r for _, r in parts])
        requests = np.concatenate([np.full(r.shape, p.index) for p, r in parts])
        positions = np.concatenate([p.first_position + (r - p.start) for p, r in parts])
        all_tokens = isinstance(spec, MlpProjectionRemoval) and spec.tokens == "all_non_primary"
        keep = positions != primary_position
        rows, requests, positions = rows[keep], requests[keep], positions[keep]
        if rows.size == 0:
            continue
        plan.mlp.setdefault(key[0], []).append(MlpEdit(spec, key[1], torch.from_numpy(rows), requests, positions,
                                                       flagged_only=not all_tokens))
    return plan


@dataclass
class AppliedEdit:
    """What one edit did at one layer: the rows it changed (for records and metrics)."""

    layer: int
    intervention: InterventionSpec
    policy: str
    requests: np.ndarray
    positions: np.ndarray


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
        mlp_out.index_copy_(0, rows, edit.intervention.apply(chosen, rule.direction, rule.median_norm)
                            .to(mlp_out.dtype))
        applied.append(AppliedEdit(layer, edit.intervention, edit.policy, requests, positions))
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
