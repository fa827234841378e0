"""Attention-confirmed sinks: the ground truth the hidden-state detector is judged against.

The paper's detector reads hidden states only (alignment with the primary sink). Whether a
flagged token is a sink is a statement about *attention*, which the offline scan measures: the
mean attention each key receives from the queries that see it (the sink score, per head). A key
is an **attention-confirmed sink** when its head-averaged score is at least ``ratio`` times the
score it would get if every query spread its attention evenly over the keys it sees (its uniform
share), for at least ``layers`` consecutive layers, judged only where at least ``min_queries``
queries see the key (a key near the end of a prompt has too few voters to say anything).

Two grades are used (:class:`~sinkguard.core.settings.ConfirmationConfig`): *strong* sinks (default
>= 10x for >= 6 layers), which the detector must find (recall: a flag of secondary or primary kind
within ``match_distance`` positions), and *weak* sinks (>= 3x for >= 3 layers), which every sink
flag must at least match, or it is *unexplained* (a false alarm). Noise-kind flags are counted
and reported but claim no sink. Engine independent: inputs are the scan's ``[L, H, T]`` scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sinkguard.core.attention import uniform_share, visible_queries
from sinkguard.core.detection import SinkEvent
from sinkguard.core.settings import ConfirmationConfig


def uniform_ratio(head_scores: np.ndarray, windows: Sequence[int | None] | None, min_queries: int) -> np.ndarray:
    """``[L, T]``: head-averaged sink score over the uniform share; NaN where fewer than
    ``min_queries`` queries see the key (per layer: sliding-window layers have fewer voters)."""
    num_layers, _, length = head_scores.shape
    windows = list(windows) if windows is not None else [None] * num_layers
    ratio = np.full((num_layers, length), np.nan)
    baselines: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
    for layer in range(num_layers):
        window = windows[layer]
        if window not in baselines:
            baselines[window] = (uniform_share(length, window).numpy(), visible_queries(length, window).numpy())
        share, votes = baselines[window]
        with warnings.catch_warnings():  # keys no query scores are all-NaN columns: NaN is the answer
            warnings.simplefilter("ignore", RuntimeWarning)
            scores = np.nanmean(head_scores[layer], axis=0)
        ratio[layer] = np.where(votes >= min_queries, scores / share, np.nan)
    return ratio


def longest_run(mask: np.ndarray) -> np.ndarray:
    """``[T]``: the longest run of consecutive True layers in each column of ``mask`` [L, T]."""
    best = np.zeros(mask.shape[1], dtype=int)
    current = np.zeros(mask.shape[1], dtype=int)
    for row in mask:
        current = np.where(row, current + 1, 0)
        best = np.maximum(best, current)
    return best


@dataclass
class ConfirmedSinks:
    """One prompt's attention-confirmed sinks (positions other than the reference)."""

    strong: np.ndarray  # positions
    weak: np.ndarray  # positions (strong ones included)
    judged_until: int  # positions >= this have fewer than min_queries voters in some layer
    ratio: np.ndarray  # [L, T] uniform ratio (NaN where not judged)


def confirmed_sinks(
    head_scores: np.ndarray, windows: Sequence[int | None] | None, config: ConfirmationConfig, reference: int = 0
) -> ConfirmedSinks:
    ratio = uniform_ratio(head_scores, windows, config.min_queries)
    judged = ~np.isnan(ratio)
    judged_until = int(np.flatnonzero(judged.all(axis=0))[-1]) + 1 if judged.all(axis=0).any() else 0
    with np.errstate(invalid="ignore"):
        strong_run = longest_run(ratio >= config.strong_ratio)
        weak_run = longest_run(ratio >= config.weak_ratio)
    candidates = np.arange(ratio.shape[1])
    keep = (candidates != reference) & (candidates < judged_until)
    return ConfirmedSinks(
        strong=candidates[keep & (strong_run >= config.strong_layers)],
        weak=candidates[keep & (weak_run >= config.weak_layers)],
        judged_until=judged_until,
        ratio=ratio,
    )


def _near(positions: np.ndarray, targets: np.ndarray, distance: int) -> np.ndarray:
    """For each of ``positions``: is some target within ``distance``?"""
    if positions.size == 0 or targets.size == 0:
        return np.zeros(positions.shape, dtype=bool)
    return (np.abs(positions[:, None] - targets[None, :]) <= distance).any(axis=1)


@dataclass
class Agreement:
    """How hidden-state flags agree with attention-confirmed sinks, over one or more prompts."""

    prompts: int = 0
    tokens_judged: int = 0
    strong: int = 0
    strong_found: int = 0  # strong sinks with a sink flag (secondary or primary kind) within match_distance
    weak: int = 0
    flags: dict[str, int] = field(default_factory=lambda: {"secondary": 0, "primary": 0, "noise": 0})
    unexplained: dict[str, int] = field(default_factory=lambda: {"secondary": 0, "primary": 0, "noise": 0})

    @classmethod
    def total(cls, parts: Iterable[Agreement]) -> Agreement:
        """The pooled agreement of several prompts."""
        pooled = cls()
        for part in parts:
            pooled.add(part)
        return pooled

    def add(self, other: Agreement) -> None:
        self.prompts += other.prompts
        self.tokens_judged += other.tokens_judged
        self.strong += other.strong
        self.strong_found += other.strong_found
        self.weak += other.weak
        for kind in self.flags:
            self.flags[kind] += other.flags[kind]
            self.unexplained[kind] += other.unexplained[kind]

    @property
    def recall(self) -> float | None:
        """Share of strong attention sinks that a sink flag found (None: there were none)."""
        return self.strong_found / self.strong if self.strong else None

    @property
    def unexplained_per_256(self) -> float:
        """Sink flags (secondary or primary kind, never the reference) that match no attention sink,
        per 256 judged tokens. Primary-kind flags count too: on a model whose every hidden state is
        aligned with the reference, ordinary tokens are flagged through all layers and would
        otherwise hide as "primary"."""
        return 256.0 * (self.unexplained["secondary"] + self.unexplained["primary"]) / max(self.tokens_judged, 1)

    def precision(self, kind: str = "secondary") -> float | None:
        flags = self.flags[kind]
        return (flags - self.unexplained[kind]) / flags if flags else None

    def meets(self, config: ConfirmationConfig) -> bool:
        recall_ok = self.recall is None or self.recall >= config.target_recall
        return recall_ok and self.unexplained_per_256 <= config.target_unexplained_per_256

    def to_dict(self) -> dict:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(float(value), 4)

        return {
            "prompts": self.prompts,
            "tokens_judged": self.tokens_judged,
            "strong_attention_sinks": self.strong,
            "weak_attention_sinks": self.weak,
            "strong_found": self.strong_found,
            "recall": rounded(self.recall),
            "unexplained_sink_flags_per_256_tokens": rounded(self.unexplained_per_256),
            "flags": dict(self.flags),
            "unexplained_flags": dict(self.unexplained),
            "precision": {kind: rounded(self.precision(kind)) for kind in self.flags},
        }


def agreement(
    events: Iterable[SinkEvent], confirmed: ConfirmedSinks, config: ConfirmationConfig
) -> Agreement:
    """Compare one prompt's detector events with its attention-confirmed sinks (judged positions only)."""
    result = Agreement(prompts=1, tokens_judged=max(confirmed.judged_until - 1, 0),
                       strong=int(confirmed.strong.size), weak=int(confirmed.weak.size))
    by_kind: dict[str, list[int]] = {"secondary": [], "primary": [], "noise": []}
    for event in events:
        if not event.is_reference and 0 < event.position < confirmed.judged_until:
            by_kind[event.kind].append(event.position)
    for kind, positions in by_kind.items():
        flagged = np.asarray(positions, dtype=int)
        result.flags[kind] = int(flagged.size)
        result.unexplained[kind] = int((~_near(flagged, confirmed.weak, config.match_distance)).sum())
    sink_flags = np.asarray(by_kind["secondary"] + by_kind["primary"], dtype=int)
    result.strong_found = int(_near(confirmed.strong, sink_flags, config.match_distance).sum())
    return result
