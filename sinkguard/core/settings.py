"""Typed, validated settings of the detector and the scan, and the strict base models every config uses.

One model per concern, every field documented, unknown keys rejected: a typo in a config file
fails at startup with the field's name instead of being silently ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from sinkguard.errors import ConfigError


class StrictModel(BaseModel):
    # allow_inf_nan=False: no setting of sinkguard means anything at infinity, and one non-finite
    # parameter reaching the model would write NaN/Inf into the residual stream and the KV cache
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WireModel(StrictModel):
    """Settings a client sends (per-request options, policies): strict types as well, so ``"yes"``
    is no bool and ``"10"`` no int. An int still passes for a float (YAML and JSON write 1 for 1.0)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class LifetimeRule(StrictModel):
    """How a flagged token's lifetime (in layers) decides its kind.

    The paper's code uses absolute numbers for 30-64 layer models (primary: lifetime >= L-15,
    noise: lifetime <= 4). Those make no sense for an 18-layer model, so the default is relative
    to the number of decoder layers L: primary when lifetime >= ``primary_min_fraction * L``,
    noise when lifetime <= ``noise_max_fraction * L`` (at least 1 layer), secondary in between.
    For L = 30 this gives primary >= 15 and noise <= 3; the paper's rule is ``preset='paper'``.
    """

    preset: Literal["relative", "paper"] = "relative"
    """``relative`` (fractions of L, below) or ``paper`` (L-15 / 4, as in Wong et al.'s code)."""
    primary_min_fraction: float = Field(0.5, gt=0.0, le=1.0)
    """Fraction of the layers a token must stay flagged to count as a primary sink."""
    noise_max_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Lifetimes up to this fraction of the layers are noise."""

    def thresholds(self, num_layers: int) -> tuple[int, int]:
        """Return ``(primary_min_lifetime, noise_max_lifetime)`` for a model with ``num_layers``."""
        if self.preset == "paper":
            primary = max(1, num_layers - 15)
            noise = min(4, primary - 1)
        else:
            primary = max(1, math.ceil(self.primary_min_fraction * num_layers))
            noise = min(max(1, math.floor(self.noise_max_fraction * num_layers)), primary - 1)
        return primary, noise

    def classify(self, lifetime: int, num_layers: int) -> Literal["primary", "secondary", "noise"]:
        primary, noise = self.thresholds(num_layers)
        if lifetime >= primary:
            return "primary"
        if lifetime <= noise:
            return "noise"
        return "secondary"


class DetectorConfig(StrictModel):
    """The hidden-state sink detector (Wong et al. 2025), engine independent.

    The defaults are the setting that met the agreement targets with attention-confirmed sinks on
    every trained family measured (``benchmarks/detector_families.py``, docs/families.md); a
    calibrated profile replaces them with the model's own choice. :meth:`paper` is the paper's rule.
    """

    cos_threshold: float = Field(0.9, gt=0.0, lt=1.0)
    """A token is flagged at a layer when |cos(h_t, h_ref)| exceeds this."""
    reference_candidates: int = Field(3, ge=1, le=8)
    """The reference primary sink is the one of the first N positions with the largest mean norm."""
    window_rule: Literal["norm_ratio", "paper"] = "norm_ratio"
    """Active-window rule. ``norm_ratio``: layers where the reference's hidden-state norm is at
    least ``window_min_norm_ratio`` x the median token's (the reference is an outlier there, so
    alignment with it means something). ``paper``: from the layer after the reference's largest
    norm jump to the layer after the largest following drop; on SmolLM2 it starts at layer 11,
    after every secondary sink has ended, so it is offered for comparison only."""
    window_min_norm_ratio: float = Field(1.5, gt=1.0)
    """Minimum reference/median norm ratio for a layer to be inside the ``norm_ratio`` window."""
    lifetime: LifetimeRule = LifetimeRule()
    """Lifetime thresholds that separate primary, secondary and noise."""
    formation_lookback: int = Field(1, ge=0, le=4)
    """The forming MLP is searched in layers [birth - lookback, birth]."""
    min_norm_ratio: float = Field(2.0, ge=0.0)
    """A layer flags a token only if the token's hidden-state norm is also at least this many times
    the median token's there (0: no norm condition). Alignment alone is not enough on models whose
    hidden states all share a dominant direction (Gemma 3): a sink carries a *large* aligned vector."""
    min_formation_ratio: float = Field(12.0, ge=0.0)
    """A flagged token is a sink only if its forming MLP output is at least this many times the
    median token's (0: no formation condition): the paper's formation signal, used as evidence."""

    @classmethod
    def paper(cls) -> DetectorConfig:
        """Wong et al.'s rule as published: |cos| > 0.9 inside the jump-to-drop window, lifetime
        thresholds L-15 / 4, no norm or formation condition."""
        return cls(window_rule="paper", lifetime=LifetimeRule(preset="paper"), min_norm_ratio=0.0,
                   min_formation_ratio=0.0)

    @classmethod
    def alignment_only(cls) -> DetectorConfig:
        """sinkguard's first default (norm-ratio window at 2x, |cos| > 0.9, no norm or formation
        condition): right on SmolLM2, flags most tokens on Gemma 3. Kept for comparison."""
        return cls(window_min_norm_ratio=2.0, min_norm_ratio=0.0, min_formation_ratio=0.0)


class AttentionConfig(StrictModel):
    """The attention-based sink score (mean attention a key receives from later queries)."""

    enabled: bool = True
    """Compute attention sink scores (costs one chunked attention pass per layer)."""
    min_votes: int = Field(16, ge=1)
    """A key needs at least this many queries (itself included) before its score is reported."""
    query_chunk: int = Field(128, ge=8)
    """Queries processed at once per KV head; extra memory is (heads / kv_heads) x chunk x T floats."""
    sink_score_threshold: float = Field(0.1, gt=0.0, lt=1.0)
    """A key is counted as an attention sink at a layer when its score exceeds this."""


class ConfirmationConfig(StrictModel):
    """When attention confirms a sink: the ground truth the hidden-state detector is judged by
    (:mod:`sinkguard.core.confirmation`), and the agreement calibration must reach."""

    strong_ratio: float = Field(10.0, gt=1.0)
    """A strong sink draws at least this many times its uniform share of attention ..."""
    strong_layers: int = Field(6, ge=1)
    """... for at least this many consecutive layers. The detector must find these (recall)."""
    weak_ratio: float = Field(3.0, gt=1.0)
    """A weak sink draws at least this many times its uniform share ..."""
    weak_layers: int = Field(3, ge=1)
    """... for at least this many consecutive layers. A flag matching none is unexplained."""
    min_queries: int = Field(64, ge=1)
    """A key is judged only where at least this many queries see it (in every layer)."""
    match_distance: int = Field(1, ge=0)
    """A flag and an attention sink match when at most this many positions apart."""
    target_recall: float = Field(0.9, ge=0.0, le=1.0)
    """Calibration target: share of strong sinks found by a sink flag (secondary or primary kind)."""
    target_unexplained_per_256: float = Field(0.5, ge=0.0)
    """Calibration target: sink flags (secondary or primary kind) matching no weak sink, per 256
    judged tokens."""


class ScanConfig(StrictModel):
    """Everything a scan needs besides the model and prompts."""

    detector: DetectorConfig = DetectorConfig()
    attention: AttentionConfig = AttentionConfig()
    confirmation: ConfirmationConfig = ConfirmationConfig()
    add_bos: bool = True
    """Prepend the tokenizer's BOS token when the tokenizer does not add one itself."""
    max_tokens: int | None = Field(None, ge=2)
    """Truncate prompts to this many tokens (``None``: refuse prompts longer than the context)."""


def read_json_config(path: Path | str, what: str = "config file") -> Any:
    """Parse a JSON config file; ConfigError for a missing or malformed file."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from exc


def load_config(path: Path | str | None, **overrides: Any) -> ScanConfig:
    """Read a ScanConfig from a JSON file plus overrides; errors name the offending field."""
    data: dict[str, Any] = read_json_config(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(ScanConfig, data)


def describe_validation_error(exc: pydantic.ValidationError, prefix: str = "") -> str:
    """``field.path: message; ...`` for every problem pydantic found."""
    return "; ".join(
        f"{prefix}{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )


def validate_config(model: type[StrictModel], data: Any) -> Any:
    """Validate ``data`` into ``model``; raise ConfigError naming each bad field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid {model.__name__}: {describe_validation_error(exc)}") from None
