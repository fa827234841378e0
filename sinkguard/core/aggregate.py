"""Model-level statistics over many scanned sequences: sink levels, tokens, mass by layer.

Engine independent: inputs are per-prompt detections plus (optionally) attention sink scores.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from sinkguard.core.detection import Detection, SinkEvent


@dataclass
class PromptResult:
    """Detection and scores of one prompt, as the aggregates need them."""

    detection: Detection
    tokens: list[str]
    sink_scores: np.ndarray | None  # [L, T] head-averaged, NaN where too few votes
    head_scores: np.ndarray | None  # [L, H, T]

    @property
    def secondary(self) -> list[SinkEvent]:
        return [e for e in self.detection.events if e.kind == "secondary" and not e.is_reference]


def _nanmean(stack: list[np.ndarray], shape: int | tuple[int, ...]) -> np.ndarray:
    """Element-wise mean over arrays, ignoring NaN; NaN where every entry is NaN."""
    if not stack:
        return np.full(shape, np.nan)
    with np.errstate(all="ignore"):
        arr = np.stack(stack)
        counts = np.sum(~np.isnan(arr), axis=0)
        sums = np.nansum(arr, axis=0)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@dataclass
class ModelSummary:
    """What a scan says about the model as a whole."""

    num_prompts: int
    num_tokens: int
    num_layers: int
    kinds: dict[str, int]
    sink_levels: list[dict]  # [{birth_layer, lifetime, kind, count}]
    tokens: list[dict]  # [{token, count}] for secondary sinks
    forming_layers: list[dict]  # [{layer, count, mlp_norm_ratio_median, mlp_cos_median}]
    window_layers: list[int]  # layers inside the active window in at least half the prompts
    primary_score_by_layer: list[float | None] = field(default_factory=list)
    secondary_score_by_layer: list[float | None] = field(default_factory=list)
    secondary_to_primary_by_layer: list[float | None] = field(default_factory=list)
    head_primary_score: np.ndarray | None = None  # [L, H]
    head_secondary_score: np.ndarray | None = None  # [L, H]

    def to_dict(self) -> dict:
        def listify(values: np.ndarray | list) -> list[float | None]:
            return [None if v is None or not np.isfinite(v) else round(float(v), 6) for v in values]

        return {
            "num_prompts": self.num_prompts,
            "num_tokens": self.num_tokens,
            "num_layers": self.num_layers,
            "kinds": self.kinds,
            "sink_levels": self.sink_levels,
            "tokens": self.tokens,
            "forming_layers": self.forming_layers,
            "window_layers": self.window_layers,
            "primary_score_by_layer": listify(self.primary_score_by_layer),
            "secondary_score_by_layer": listify(self.secondary_score_by_layer),
            "secondary_to_primary_by_layer": listify(self.secondary_to_primary_by_layer),
        }


def summarize(results: list[PromptResult], num_layers: int) -> ModelSummary:
    kinds: Counter[str] = Counter()
    levels: Counter[tuple[int, int, str]] = Counter()
    tokens: Counter[str] = Counter()
    forming: dict[int, list[SinkEvent]] = defaultdict(list)
    window_votes = np.zeros(num_layers)
    primary_curves: list[np.ndarray] = []
    secondary_curves: list[np.ndarray] = []
    head_primary: list[np.ndarray] = []
    head_secondary: list[np.ndarray] = []
    for result in results:
        window_votes += result.detection.window
        for event in result.detection.events:
            kinds["reference" if event.is_reference else event.kind] += 1
            if event.is_reference:
                continue
            levels[(event.birth_layer, event.lifetime, event.kind)] += 1
            if event.kind == "secondary":
                tokens[result.tokens[event.position]] += 1
                if event.forming_layer is not None:
                    forming[event.forming_layer].append(event)
        if result.sink_scores is not None:
            ref = result.detection.reference
            primary_curves.append(result.sink_scores[:, ref])
            positions = [e.position for e in result.secondary]
            if positions:
                secondary_curves.append(np.nanmean(result.sink_scores[:, positions], axis=1))
        if result.head_scores is not None:
            head_primary.append(result.head_scores[:, :, result.detection.reference])
            positions = [e.position for e in result.secondary]
            if positions:
                with np.errstate(all="ignore"), warnings.catch_warnings():  # all-NaN heads stay NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    head_secondary.append(np.nanmean(result.head_scores[:, :, positions], axis=2))
    primary = _nanmean(primary_curves, num_layers)
    secondary = _nanmean(secondary_curves, num_layers)
    with np.errstate(all="ignore"):
        ratio = secondary / primary
    forming_rows = [
        {
            "layer": layer,
            "count": len(events),
            "mlp_norm_ratio_median": round(float(np.median([e.mlp_norm_ratio for e in events])), 3),
            "mlp_cos_median": round(float(np.median([e.mlp_cos for e in events])), 4),
        }
        for layer, events in sorted(forming.items())
    ]
    return ModelSummary(
        num_prompts=len(results),
        num_tokens=sum(len(r.tokens) for r in results),
        num_layers=num_layers,
        kinds={k: kinds.get(k, 0) for k in ("reference", "primary", "secondary", "noise")},
        sink_levels=[
            {"birth_layer": b, "lifetime": life, "kind": kind, "count": n}
            for (b, life, kind), n in sorted(levels.items())
        ],
        tokens=[{"token": tok, "count": n} for tok, n in tokens.most_common()],
        forming_layers=forming_rows,
        window_layers=[int(i) for i in np.flatnonzero(window_votes >= max(1, len(results)) / 2)],
        primary_score_by_layer=list(primary),
        secondary_score_by_layer=list(secondary),
        secondary_to_primary_by_layer=list(ratio),
        head_primary_score=_nanmean(head_primary, 0) if head_primary else None,
        head_secondary_score=_nanmean(head_secondary, 0) if head_secondary else None,
    )
