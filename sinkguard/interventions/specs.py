"""Interventions on sinks: typed specs, a registry by name, and the engine-independent arithmetic.

An intervention is one small class: its parameters (pydantic, ranges checked, unknown keys
rejected), a ``kind`` name it is registered under, and what it computes on float32 tensors. Engine
adapters (transformers hooks, vLLM layer wrappers) decide *where* to call it; they never
re-implement the arithmetic, so both engines compute the same thing.

- ``mlp_projection_removal``: ``m' = m - alpha (m . u) u`` for a token's MLP output ``m`` at a
  forming layer, ``u`` the profile's unit sink direction of that layer's MLP output;
- ``mlp_norm_clamp``: rescale ``m`` to a target norm (absolute, or relative to the median token's
  MLP output norm at that layer; 0 zeroes it);
- ``attention_redistribution`` (ACT) and ``first_token_scaling`` (ZeroTuning): scale the attention
  mass on the request's secondary sinks / on the primary sink by ``beta`` / ``gamma`` and give the
  removed mass to the other keys in proportion (:mod:`sinkguard.interventions.redistribution`).

Which tokens an MLP edit touches is decided *in the forward pass* by the formation signal at
that layer (:func:`formation_rows`): the sink is born there, so the decision cannot wait for
later layers.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import AfterValidator, Field, model_validator

from sinkguard.core.settings import WireModel

Phase = Literal["prefill", "decode"]
MAX_INDEX = 1 << 16  # no model has this many layers or heads; bounds what a request can name
MAX_TARGET_NORM = 1e4  # absolute MLP output norm; larger would overflow float16 and the next RMSNorm's squares
MAX_RELATIVE_NORM = 100.0  # x the median token's MLP output norm (a strong sink is ~25x)


def _unique(values: list | None) -> list | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"duplicates in {values} (each may appear once)")
    return values


Indices = Annotated[list[Annotated[int, Field(ge=0, lt=MAX_INDEX)]], Field(min_length=1, max_length=4096),
                    AfterValidator(_unique)]


class InterventionSpec(WireModel):
    """What every intervention has: where it applies. Parameters arrive from clients (inline
    policies) too: strictly typed, finite and bounded, lists without duplicates."""

    kind: str
    layers: Indices | None = None
    """Layers it acts in (default: MLP edits at the profile's forming layers; attention edits need
    an explicit or calibrated list)."""
    phases: Annotated[list[Phase], Field(min_length=1), AfterValidator(_unique)] = ["prefill", "decode"]
    """Engine-step phases of the tokens it edits."""

    family: ClassVar[Literal["mlp", "attention"]]


class MlpProjectionRemoval(InterventionSpec):
    kind: Literal["mlp_projection_removal"] = "mlp_projection_removal"
    alpha: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of the MLP output's component along the sink direction that is removed."""
    tokens: Literal["flagged", "all_non_primary"] = "flagged"
    """``flagged``: tokens the formation signal flags at that layer; ``all_non_primary``: every
    token but the primary sink (position 0)."""
    family: ClassVar[Literal["mlp", "attention"]] = "mlp"

    def apply(self, mlp_rows: torch.Tensor, direction: torch.Tensor, median_norm: float) -> torch.Tensor:
        rows = mlp_rows.float()
        unit = direction.float() / direction.float().norm().clamp_min(1e-12)
        return rows - self.alpha * (rows @ unit)[:, None] * unit[None, :]


class MlpNormClamp(InterventionSpec):
    kind: Literal["mlp_norm_clamp"] = "mlp_norm_clamp"
    target_norm: float | None = Field(None, ge=0.0, le=MAX_TARGET_NORM)
    """Absolute norm the flagged token's MLP output is rescaled to."""
    relative_norm: float | None = Field(None, ge=0.0, le=MAX_RELATIVE_NORM)
    """Or: this many times the median token's MLP output norm at that layer (profile)."""
    family: ClassVar[Literal["mlp", "attention"]] = "mlp"

    @model_validator(mode="after")
    def _one_target(self) -> MlpNormClamp:
        if (self.target_norm is None) == (self.relative_norm is None):
            raise ValueError("give exactly one of target_norm and relative_norm")
        return self

    def apply(self, mlp_rows: torch.Tensor, direction: torch.Tensor, median_norm: float) -> torch.Tensor:
        rows = mlp_rows.float()
        target = self.target_norm if self.target_norm is not None else self.relative_norm * median_norm
        return rows * (target / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))


class AttentionRedistribution(InterventionSpec):
    kind: Literal["attention_redistribution"] = "attention_redistribution"
    beta: float = Field(0.0, ge=0.0, le=1.0)
    """Attention kept on each secondary-sink key (the rest goes to the other keys in proportion)."""
    heads: Indices | None = None
    """Query heads it acts on (None: all heads of the chosen layers)."""
    family: ClassVar[Literal["mlp", "attention"]] = "attention"


class FirstTokenScaling(InterventionSpec):
    kind: Literal["first_token_scaling"] = "first_token_scaling"
    gamma: float = Field(0.5, ge=0.0, le=1.0)
    """Attention kept on the primary sink (position 0)."""
    heads: Indices | None = None
    family: ClassVar[Literal["mlp", "attention"]] = "attention"


INTERVENTIONS: dict[str, type[InterventionSpec]] = {}


def register(cls: type[InterventionSpec]) -> type[InterventionSpec]:
    """Register an intervention class under its ``kind`` (adding one is a class plus this call)."""
    INTERVENTIONS[cls.model_fields["kind"].default] = cls
    return cls


for _cls in (MlpProjectionRemoval, MlpNormClamp, AttentionRedistribution, FirstTokenScaling):
    register(_cls)


def formation_rows(mlp_rows: torch.Tensor, direction: torch.Tensor, median_norm: float, min_ratio: float,
                   cos_threshold: float) -> torch.Tensor:
    """Bool [N]: tokens whose MLP output at this layer is a sink being formed (large and aligned
    with the layer's sink direction), the formation signal of the detector."""
    rows = mlp_rows.float()
    norms = rows.norm(dim=-1)
    unit = direction.float() / direction.float().norm().clamp_min(1e-12)
    cos = (rows @ unit) / norms.clamp_min(1e-12)
    return (norms >= min_ratio * median_norm) & (cos.abs() >= cos_threshold)


def keep_finite(edited: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``edited`` rows (dim 0) with every row holding a NaN or an infinity replaced by ``original``'s,
    and the bool mask of those rows. Whatever a policy computes, nothing non-finite reaches the
    residual stream or the KV cache: there it would outlive the request (freed KV blocks are reused
    by other requests) and poison other tenants' outputs."""
    bad = ~torch.isfinite(edited).flatten(1).all(dim=1)
    return torch.where(bad.view(-1, *([1] * (edited.dim() - 1))), original, edited), bad
