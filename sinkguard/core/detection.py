"""The hidden-state sink detector of Wong et al. (2025), engine independent.

Terms follow the paper: the *reference* is the primary-sink token; a token is *flagged* at a
layer when its hidden state is (anti-)aligned with the reference's, inside the *active window*;
its first flagged layer is its *birth layer*, the length of its flagged run its *lifetime*;
(birth, lifetime) is its *sink level*; the lifetime decides its kind (primary / secondary /
noise). The *forming layer* is the MLP whose output made the token a sink.

Inputs are the small ``[L, T]`` arrays of :class:`~sinkguard.core.trace.SequenceTrace` (or the
same arrays for the tokens of one decode step), so the offline scanner and the online detector
run exactly this code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np

from sinkguard.core.settings import DetectorConfig

SinkKind = Literal["primary", "secondary", "noise"]


@dataclass
class SinkEvent:
    """One token that the detector flagged, in the report's vocabulary."""

    position: int
    birth_layer: int
    lifetime: int
    last_layer: int
    kind: SinkKind
    flagged_layers: list[int]
    forming_layer: int | None = None
    mlp_norm_ratio: float | None = None
    mlp_cos: float | None = None
    token_id: int | None = None
    token: str | None = None
    is_reference: bool = False
    peak_sink_score: float | None = None
    peak_score_layer: int | None = None
    extras: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        # Field by field rather than dataclasses.asdict (a recursive deep copy): the online path
        # converts every event of a prefill step.
        out = {name: getattr(self, name) for name in _EVENT_FIELDS}
        out["flagged_layers"] = list(self.flagged_layers)
        out.update(self.extras)
        return out


_EVENT_FIELDS = tuple(f.name for f in fields(SinkEvent) if f.name != "extras")


def choose_reference(hidden_norm: np.ndarray, candidates: int) -> int:
    """Position (among the first ``candidates``) with the largest mean hidden-state norm."""
    n = min(candidates, hidden_norm.shape[1])
    return int(np.argmax(hidden_norm[:, :n].mean(axis=0)))


def reference_norm_ratio(hidden_norm: np.ndarray, reference: int) -> np.ndarray:
    """Per layer: the reference's norm over the median token's norm, shape [L]."""
    median = np.median(hidden_norm, axis=1)
    return hidden_norm[:, reference] / np.maximum(median, 1e-12)


def active_window(norm_ratio: np.ndarray, reference_norm: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """Boolean [L]: layers where alignment with the reference is evidence of a sink.

    ``norm_ratio`` (default): the reference is an outlier (ratio >= ``window_min_norm_ratio``).
    ``paper``: from the layer after the reference's largest norm jump to the layer after the
    largest drop that follows it (the paper's rule, literally).
    """
    num_layers = norm_ratio.shape[0]
    window = np.zeros(num_layers, dtype=bool)
    if config.window_rule == "norm_ratio":
        return norm_ratio >= config.window_min_norm_ratio
    if num_layers < 2:
        return ~window
    jumps = np.diff(reference_norm)
    start = int(np.argmax(jumps)) + 1
    following = jumps[start:]
    end = start + int(np.argmin(following)) + 1 if following.size else num_layers - 1
    window[start : min(end, num_layers - 1) + 1] = True
    return window


def flag_matrix(
    hidden_cos: np.ndarray,
    window: np.ndarray,
    threshold: float,
    norm_ratio: np.ndarray | None = None,
    min_norm_ratio: float = 0.0,
) -> np.ndarray:
    """Boolean [L, T]: |cos| above threshold inside the active window (and, with
    ``min_norm_ratio`` > 0, a hidden-state norm at least that many times the median token's;
    ``norm_ratio`` is the tokens' [L, T] norm over the median)."""
    flags = (np.abs(hidden_cos) > threshold) & window[:, None]
    if min_norm_ratio > 0 and norm_ratio is not None:
        flags &= norm_ratio >= min_norm_ratio
    return flags


@dataclass
class Runs:
    """Every column's first flagged run, computed for all columns at once (no Python loop)."""

    flagged: np.ndarray  # [N] bool: the column has a run
    birth: np.ndarray  # [N] first flagged layer (0 where none)
    last: np.ndarray  # [N] last layer of the run
    in_run: np.ndarray  # [L, N] bool: layers flagged within the run

    @property
    def lifetime(self) -> np.ndarray:
        return self.last - self.birth + 1


def flagged_runs(flags: np.ndarray, window: np.ndarray) -> Runs:
    """The run of each column of ``flags`` [L, N], by the rule of :func:`flagged_run`."""
    num_layers = flags.shape[0]
    layer = np.arange(num_layers)[:, None]
    birth = flags.argmax(axis=0)
    breaks = window[:, None] & ~flags & (layer > birth)
    stop = np.where(breaks.any(axis=0), breaks.argmax(axis=0), num_layers)
    in_run = flags & (layer >= birth) & (layer < stop)
    last = num_layers - 1 - in_run[::-1].argmax(axis=0)
    return Runs(flagged=flags.any(axis=0), birth=birth, last=last, in_run=in_run)


def flagged_run(column: np.ndarray, window: np.ndarray) -> tuple[int, int, list[int]] | None:
    """Birth, last layer and flagged layers of the first run in one token's flag column.

    The run starts at the first flagged layer and continues through flagged layers; layers
    outside the active window are stepped over (they can neither flag nor end a run, since the
    reference is not an outlier there); the first in-window unflagged layer ends it.
    Returns None when the token is never flagged.
    """
    runs = flagged_runs(column[:, None], window)
    if not runs.flagged[0]:
        return None
    return int(runs.birth[0]), int(runs.last[0]), [int(i) for i in np.flatnonzero(runs.in_run[:, 0])]


def detect_sinks(
    flags: np.ndarray,
    window: np.ndarray,
    config: DetectorConfig,
    num_layers: int | None = None,
    positions: np.ndarray | None = None,
) -> list[SinkEvent]:
    """Sink events for every token with at least one flagged layer.

    ``flags`` is [L, N] for N tokens (a whole prompt, or the new tokens of one decode step);
    ``positions`` maps columns to sequence positions (default: 0..N-1).
    """
    num_layers = num_layers or flags.shape[0]
    if positions is None:
        positions = np.arange(flags.shape[1])
    columns = np.flatnonzero(flags.any(axis=0))
    if columns.size == 0:
        return []
    runs = flagged_runs(flags[:, columns], window)
    births, lasts, lifetimes = runs.birth.tolist(), runs.last.tolist(), runs.lifetime.tolist()
    events: list[SinkEvent] = []
    for i, column in enumerate(columns.tolist()):
        lifetime = lifetimes[i]
        events.append(
            SinkEvent(
                position=int(positions[column]),
                birth_layer=births[i],
                lifetime=lifetime,
                last_layer=lasts[i],
                kind=config.lifetime.classify(lifetime, num_layers),
                flagged_layers=np.flatnonzero(runs.in_run[:, i]).tolist(),
            )
        )
    return events


def attribute_formation(
    events: list[SinkEvent],
    mlp_norm: np.ndarray,
    mlp_cos: np.ndarray,
    mlp_median: np.ndarray,
    lookback: int,
    columns: dict[int, int] | None = None,
) -> None:
    """Fill ``forming_layer``, ``mlp_norm_ratio`` and ``mlp_cos`` of each event in place.

    The forming MLP is the one, among layers [birth - lookback, birth], whose output for the
    token is largest relative to the median token's (``mlp_median`` [L], from the same prompt
    offline or from the profile online). ``mlp_cos`` is that output's cosine with the reference.
    ``columns`` maps an event's position to its column in the arrays (identity by default).
    """
    ratio = mlp_norm / np.maximum(mlp_median[:, None], 1e-12)
    for event in events:
        col = columns[event.position] if columns is not None else event.position
        lo = max(0, event.birth_layer - lookback)
        candidates = ratio[lo : event.birth_layer + 1, col]
        layer = lo + int(np.argmax(candidates))
        event.forming_layer = layer
        event.mlp_norm_ratio = float(ratio[layer, col])
        event.mlp_cos = float(mlp_cos[layer, col])


@dataclass
class Detection:
    """Result of running the detector on one sequence."""

    reference: int
    norm_ratio: np.ndarray  # [L]
    window: np.ndarray  # [L] bool
    events: list[SinkEvent]

    @property
    def window_layers(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.window)]


def detect_columns(
    hidden_cos: np.ndarray,
    mlp_norm: np.ndarray,
    mlp_cos: np.ndarray,
    window: np.ndarray,
    mlp_median: np.ndarray,
    config: DetectorConfig,
    positions: np.ndarray | None = None,
    reference: int | None = None,
    num_layers: int | None = None,
    hidden_norm: np.ndarray | None = None,
    hidden_median: np.ndarray | None = None,
) -> list[SinkEvent]:
    """Flag, detect, classify and attribute formation for N tokens against one reference.

    ``hidden_cos``, ``mlp_norm``, ``mlp_cos`` (and ``hidden_norm``, needed by the norm condition)
    are [L, N]: a whole prompt offline, or the tokens of one engine step online; the medians [L]
    come from the prompt or the profile. This is the single place both paths go through.
    """
    norm_ratio = None
    if config.min_norm_ratio > 0:
        if hidden_norm is None or hidden_median is None:
            raise ValueError("the detector's norm condition needs hidden_norm and hidden_median")
        norm_ratio = hidden_norm / np.maximum(hidden_median[:, None], 1e-12)
    flags = flag_matrix(hidden_cos, window, config.cos_threshold, norm_ratio, config.min_norm_ratio)
    events = detect_sinks(flags, window, config, num_layers=num_layers, positions=positions)
    if not events:  # the common case online: a decode step without sinks
        return events
    columns = None
    if positions is not None:
        columns = {int(p): i for i, p in enumerate(positions)}
    attribute_formation(events, mlp_norm, mlp_cos, mlp_median, config.formation_lookback, columns)
    for event in events:
        event.is_reference = event.position == reference
    if config.min_formation_ratio > 0:  # no formation signal, no sink (the reference is kept)
        events = [e for e in events if e.is_reference or (e.mlp_norm_ratio or 0.0) >= config.min_formation_ratio]
    return events


def detect_in_trace(
    hidden_norm: np.ndarray,
    hidden_cos: np.ndarray,
    mlp_norm: np.ndarray,
    mlp_cos: np.ndarray,
    config: DetectorConfig,
    reference: int | None = None,
    window: np.ndarray | None = None,
    mlp_median: np.ndarray | None = None,
    hidden_median: np.ndarray | None = None,
) -> Detection:
    """Run the whole detector on one sequence's trace arrays.

    ``hidden_cos``/``mlp_cos`` are [R, L, T]. With ``reference=None`` the reference is chosen
    among the candidates (per-prompt reference, the paper's method); otherwise row
    ``min(reference, R-1)`` is used, e.g. a profile's stored direction at row 0 with the
    reference position given. ``window`` and the medians default to this sequence's own.
    """
    if reference is None:
        reference = choose_reference(hidden_norm, hidden_cos.shape[0])
        row = reference
    else:
        row = min(reference, hidden_cos.shape[0] - 1)
    norm_ratio = reference_norm_ratio(hidden_norm, reference)
    if window is None:
        window = active_window(norm_ratio, hidden_norm[:, reference], config)
    if mlp_median is None:
        mlp_median = np.median(mlp_norm, axis=1)
    if hidden_median is None:
        hidden_median = np.median(hidden_norm, axis=1)
    events = detect_columns(hidden_cos[row], mlp_norm, mlp_cos[row], window, mlp_median, config, reference=reference,
                            hidden_norm=hidden_norm, hidden_median=hidden_median)
    return Detection(reference=reference, norm_ratio=norm_ratio, window=window, events=events)
