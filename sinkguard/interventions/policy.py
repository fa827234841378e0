"""Policies: named, validated, composable lists of interventions, shared by the CLI, the server and
the workers (one typed model; unknown keys rejected, ranges checked), loaded from YAML or JSON.

    default: none
    allow_inline: false
    policies:
      - name: act
        interventions:
          - {kind: attention_redistribution, beta: 0.2, layers: [3, 4], heads: [0, 5]}
      - name: clamp
        interventions:
          - {kind: mlp_norm_clamp, relative_norm: 3.0}

The policy ``none`` always exists and does nothing. What one policy may cost is bounded by the
file's ``budget`` (:class:`PolicyBudget`), checked for named policies at start-up and for inline
ones per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from pydantic import Field, field_validator, model_validator

from sinkguard.core.settings import StrictModel, WireModel, describe_validation_error, validate_config
from sinkguard.errors import ConfigError
from sinkguard.interventions.specs import INTERVENTIONS, InterventionSpec

NO_POLICY = "none"
INLINE_POLICY = "inline"  # the name a request's inline policy runs, is recorded and is counted under


class Policy(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    interventions: list[InterventionSpec] = Field([], max_length=4096)

    @field_validator("interventions", mode="before")
    @classmethod
    def _by_kind(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        parsed = []
        for item in value:
            if isinstance(item, InterventionSpec):
                parsed.append(item)
                continue
            kind = item.get("kind") if isinstance(item, dict) else None
            if kind not in INTERVENTIONS:
                raise ValueError(f"unknown intervention kind {kind!r} (known: {', '.join(sorted(INTERVENTIONS))})")
            try:
                parsed.append(INTERVENTIONS[kind].model_validate(item))
            except pydantic.ValidationError as exc:  # name the intervention: a policy may list several
                raise ValueError(f"intervention {len(parsed)} ({kind}): {describe_validation_error(exc)}") from None
        return parsed

    @field_validator("interventions")
    @classmethod
    def _distinct(cls, interventions: list[InterventionSpec]) -> list[InterventionSpec]:
        seen = set()
        for number, spec in enumerate(interventions):
            key = spec.model_dump_json()
            if key in seen:
                raise ValueError(f"intervention {number} ({spec.kind}) repeats an earlier one exactly; give it once")
            seen.add(key)
        return interventions


class PolicyBudget(StrictModel):
    """What one policy may cost per token (``budget`` in the policy file). Checked against the served
    model when a named policy is loaded (start-up fails) and when a request sends an inline one
    (HTTP 400); the message names the budget. Attention edits dominate: each edited (layer, query
    head) recomputes that head's attention over the request's whole context from the KV cache."""

    max_interventions: int = Field(64, ge=1, le=4096)
    """Interventions in one policy (``select-heads`` writes one per layer: raise it for deeper models)."""
    attention_share: float = Field(1.0, gt=0.0, le=64.0)
    """Attention a policy's edits recompute per token, as a share of the model's (layer, query head)
    pairs summed over its attention interventions: 1.0 is one edit over every head of every layer."""


class PolicySet(StrictModel):
    """The policies a deployment offers, its default, and whether requests may send inline specs."""

    policies: list[Policy] = []
    default: str = NO_POLICY
    allow_inline: bool = False
    """Accept a whole policy in a request (off: requests may only name a configured policy)."""
    budget: PolicyBudget = PolicyBudget()
    """What one policy (named or inline) may cost."""

    @model_validator(mode="after")
    def _consistent(self) -> PolicySet:
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names) or NO_POLICY in names or INLINE_POLICY in names:
            raise ValueError(f"policy names must be unique and neither {NO_POLICY!r} nor {INLINE_POLICY!r}: {names}")
        if self.default != NO_POLICY and self.default not in names:
            raise ValueError(f"default policy {self.default!r} is not defined (defined: {names or 'none'})")
        return self

    def get(self, name: str) -> Policy:
        if name == NO_POLICY:
            return Policy(name=NO_POLICY)
        for policy in self.policies:
            if policy.name == name:
                return policy
        raise ConfigError(f"unknown policy {name!r} (configured: {', '.join([NO_POLICY, *self.names])})")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.policies]

    def save(self, path: Path | str) -> Path:
        """Write this set as a policy file (YAML) that :func:`load_policies` reads back unchanged;
        settings left at their defaults are omitted, so the file shows what was chosen."""
        import yaml

        data = self.model_dump(exclude_defaults=True, exclude={"policies"})
        data["policies"] = [policy.model_dump(exclude_defaults=True) | {
            "interventions": [_spec_fields(spec) for spec in policy.interventions]} for policy in self.policies]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


def _spec_fields(spec: InterventionSpec) -> dict[str, Any]:
    """Every field of an intervention, its phases only when they are not the default (both)."""
    default_phases = type(spec).model_fields["phases"].default
    return spec.model_dump(exclude={"phases"} if spec.phases == default_phases else set())


@dataclass(frozen=True)
class ModelScope:
    """What a policy may name on one model: its layers, heads, and the layers where its profile saw
    secondary sinks form."""

    num_layers: int
    num_heads: int
    forming_layers: tuple[int, ...]

    @classmethod
    def from_profile(cls, profile: Any) -> ModelScope:
        return cls(profile.model.num_layers, profile.model.num_heads,
                   tuple(f.layer for f in profile.meta.forming_layers))


def attention_share(policy: Policy, scope: ModelScope) -> float:
    """The attention ``policy`` recomputes per token, as a share of the model's (layer, query head) pairs."""
    pairs = 0
    for spec in policy.interventions:
        if spec.family == "attention":
            heads = getattr(spec, "heads", None)
            pairs += (len(spec.layers) if spec.layers is not None else scope.num_layers) * \
                (len(heads) if heads is not None else scope.num_heads)
    return pairs / (scope.num_layers * scope.num_heads)


def check_budget(policy: Policy, scope: ModelScope, budget: PolicyBudget) -> None:
    """ConfigError naming the budget ``policy`` exceeds on this model."""
    if len(policy.interventions) > budget.max_interventions:
        raise ConfigError(f"policy {policy.name!r}: {len(policy.interventions)} interventions exceed the budget "
                          f"budget.max_interventions = {budget.max_interventions}")
    share = attention_share(policy, scope)
    if share > budget.attention_share:
        raise ConfigError(f"policy {policy.name!r}: its attention edits recompute {share:.3g} x the model's "
                          f"(layer, head) pairs per token, over the budget budget.attention_share = "
                          f"{budget.attention_share:g} (name fewer layers or heads, or raise the budget in the "
                          "policy file)")


def check_scope(policies: Iterable[Policy], scope: ModelScope, budget: PolicyBudget | None = None) -> None:
    """ConfigError naming any layer or head a policy names that the model does not have, any
    intervention that would never act because the profile found no secondary sinks forming, and
    (with ``budget``) a policy that costs more than the budget allows."""
    for policy in policies:
        if budget is not None:
            check_budget(policy, scope, budget)
        for spec in policy.interventions:
            layers = [x for x in spec.layers or () if x >= scope.num_layers]
            heads = [x for x in getattr(spec, "heads", None) or () if x >= scope.num_heads]
            if layers or heads:
                what = f"layers {layers} (the model has {scope.num_layers})" if layers else \
                    f"heads {heads} (the model has {scope.num_heads} query heads)"
                raise ConfigError(f"policy {policy.name!r}: {spec.kind} names {what}")
            needs_sinks = spec.kind == "attention_redistribution" or (spec.family == "mlp" and (
                spec.layers is None or getattr(spec, "tokens", "flagged") == "flagged"))
            if needs_sinks and not scope.forming_layers:
                raise ConfigError(f"policy {policy.name!r}: {spec.kind} acts on secondary sinks as they form, and "
                                  "this model's profile found none forming (no forming layers): it would never act")


def load_policies(path: Path | str) -> PolicySet:
    """Read a YAML or JSON policy file; ConfigError names the bad field."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from None
    return validate_config(PolicySet, data or {})
