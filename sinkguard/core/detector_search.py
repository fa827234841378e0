"""Attention-validated calibration: choose the detector settings that agree with attention.

The paper's test (|cos| with the primary sink > 0.9 inside a norm-based window) separates sinks
from ordinary tokens on some models and flags most tokens on others (Gemma 3 270M: every hidden
state shares one dominant direction). So the detector's settings are not a constant but a
per-model choice, made here on calibration prompts whose attention was measured: every setting of
a small grid (cosine threshold, the norm condition, the formation condition, the active window)
runs over the prompts' traces, no model needed, and is scored against the attention-confirmed
sinks of :mod:`sinkguard.core.confirmation`.

Choice: among settings that reach the targets (recall of strong sinks, unexplained flags per 256
tokens), the one with the highest recall, then the fewest unexplained sink flags, then the fewest
unexplained flags of any kind (noise included), then the most flags explained by weak sinks, then
the simplest (fewest extra conditions). When none reaches them the best compromise is kept and the
result says ``below_target``; when the calibration prompts hold no strong secondary sink at all,
``no_secondary_sinks`` is the (useful) answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sinkguard.core.confirmation import Agreement, ConfirmedSinks, agreement
from sinkguard.core.detection import active_window, choose_reference, detect_in_trace, reference_norm_ratio
from sinkguard.core.settings import ConfirmationConfig, DetectorConfig

ValidationStatus = Literal["validated", "no_secondary_sinks", "below_target", "unvalidated"]

COS_THRESHOLDS = (0.8, 0.9, 0.95, 0.98)
NORM_RATIOS = (0.0, 2.0, 3.0, 4.0, 6.0, 8.0)
FORMATION_RATIOS = (0.0, 4.0, 8.0, 12.0, 16.0)
WINDOWS = (("norm_ratio", 1.5), ("norm_ratio", 2.0), ("norm_ratio", 3.0), ("paper", 2.0))


@dataclass
class TraceArrays:
    """What the search needs of one calibration prompt (from a scan's trace and confirmation)."""

    hidden_norm: np.ndarray  # [L, T]
    hidden_cos: np.ndarray  # [R, L, T]
    mlp_norm: np.ndarray  # [L, T]
    mlp_cos: np.ndarray  # [R, L, T]
    confirmed: ConfirmedSinks


@dataclass
class Candidate:
    config: DetectorConfig
    agreement: Agreement

    def summary(self) -> dict:
        c = self.config
        return {"cos_threshold": c.cos_threshold, "min_norm_ratio": c.min_norm_ratio,
                "min_formation_ratio": c.min_formation_ratio, "window_rule": c.window_rule,
                "window_min_norm_ratio": c.window_min_norm_ratio, **self.agreement.to_dict()}


@dataclass
class SearchResult:
    status: ValidationStatus
    chosen: Candidate
    tried: list[Candidate] = field(default_factory=list)
    message: str = ""

    def to_dict(self, top: int = 10) -> dict:
        ranked = sorted(self.tried, key=rank)[:top]
        return {"status": self.status, "message": self.message, "settings_tried": len(self.tried),
                "chosen": self.chosen.summary(), "best_tried": [c.summary() for c in ranked]}


def grid(base: DetectorConfig) -> list[DetectorConfig]:
    """Every setting the search tries, simplest first (the order breaks ties)."""
    settings = []
    for formation, norm, cos, (rule, window_ratio) in itertools.product(
            FORMATION_RATIOS, NORM_RATIOS, COS_THRESHOLDS, WINDOWS):
        settings.append(base.model_copy(update={
            "cos_threshold": cos, "min_norm_ratio": norm, "min_formation_ratio": formation,
            "window_rule": rule, "window_min_norm_ratio": window_ratio}))
    return settings


def calibration_window(prompts: Sequence[TraceArrays], config: DetectorConfig) -> np.ndarray:
    """The window a profile would store for ``config``: layers in the window for at least half the
    prompts (each prompt judged by its own reference), as the online detector will use it."""
    votes = np.zeros(prompts[0].hidden_norm.shape[0])
    for prompt in prompts:
        reference = choose_reference(prompt.hidden_norm, prompt.hidden_cos.shape[0])
        ratio = reference_norm_ratio(prompt.hidden_norm, reference)
        votes += active_window(ratio, prompt.hidden_norm[:, reference], config)
    return votes >= max(1, len(prompts)) / 2


def evaluate(prompts: Sequence[TraceArrays], config: DetectorConfig, confirmation: ConfirmationConfig,
             mlp_median: np.ndarray, hidden_median: np.ndarray, window: np.ndarray) -> Agreement:
    """Agreement of ``config`` with the attention-confirmed sinks, with profile-like medians and window."""
    return Agreement.total(
        agreement(detect_in_trace(p.hidden_norm, p.hidden_cos, p.mlp_norm, p.mlp_cos, config, window=window,
                                  mlp_median=mlp_median, hidden_median=hidden_median).events, p.confirmed, confirmation)
        for p in prompts)


def rank(candidate: Candidate) -> tuple:
    """Sort key: lower is better (see the module doc for the order)."""
    a = candidate.agreement
    explained = a.flags["secondary"] + a.flags["primary"] - a.unexplained["secondary"] - a.unexplained["primary"]
    # unexplained flags of every kind count after the secondary ones: online, noise and primary
    # events are recorded too, and thousands of them would bury the real sinks
    recall = a.recall if a.recall is not None else 1.0
    return (-recall, a.unexplained_per_256, sum(a.unexplained.values()), -explained)


def search_detector(prompts: Sequence[TraceArrays], base: DetectorConfig, confirmation: ConfirmationConfig
                    ) -> SearchResult:
    """Try every setting of :func:`grid` on the calibration prompts and choose one (see module doc)."""
    if not prompts:
        raise ValueError("detector search needs calibration prompts")
    mlp_median = np.mean([np.median(p.mlp_norm, axis=1) for p in prompts], axis=0)
    hidden_median = np.mean([np.median(p.hidden_norm, axis=1) for p in prompts], axis=0)
    windows: dict[tuple[str, float], np.ndarray] = {}
    tried = []
    for config in grid(base):
        key = (config.window_rule, config.window_min_norm_ratio)
        if key not in windows:
            windows[key] = calibration_window(prompts, config)
        tried.append(Candidate(config, evaluate(prompts, config, confirmation, mlp_median, hidden_median,
                                                windows[key])))
    meeting = [c for c in tried if c.agreement.meets(confirmation)]
    strong = tried[0].agreement.strong
    # sorted() is stable: among equals the earlier (simpler) setting of the grid wins
    if meeting:
        chosen = sorted(meeting, key=rank)[0]
        if strong == 0:
            return SearchResult("no_secondary_sinks", chosen, tried,
                                "the calibration prompts hold no strong attention-confirmed secondary sink: this model "
                                "shows no secondary sinks there; the chosen setting keeps false flags within target")
        return SearchResult("validated", chosen, tried,
                            f"recall {chosen.agreement.recall:.2f} of {strong} strong attention sinks, "
                            f"{chosen.agreement.unexplained_per_256:.2f} unexplained flags per 256 tokens")
    chosen = sorted(tried, key=lambda c: (-(c.agreement.recall or 0.0) + c.agreement.unexplained_per_256,
                                          *rank(c)))[0]
    a = chosen.agreement
    return SearchResult("below_target", chosen, tried,
                        f"no detector setting reached recall >= {confirmation.target_recall} with <= "
                        f"{confirmation.target_unexplained_per_256} unexplained flags per 256 tokens; best compromise: "
                        f"recall {a.recall if a.recall is not None else float('nan'):.2f}, "
                        f"{a.unexplained_per_256:.2f} unexplained per 256 tokens")
