"""What a policy does to sinks and to quality, measured on the same prompts without and with it.

For each prompt the *baseline's* secondary sinks (detected without the policy) are the tokens
followed: their attention mass by layer (mean attention a key receives from the queries that see
it, averaged over heads), before and after; whether the detector, run again on the edited
forward pass with the same profile, still flags them as secondary sinks; and the perplexity of
the prompts (teacher forcing, every predicted token). Used by ``sinkguard scan --policy`` and by
``benchmarks/intervention_effects.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sinkguard.offline.report import ScanResult

if TYPE_CHECKING:
    from sinkguard.core.profile import SinkProfile
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.interventions.policy import Policy


@dataclass
class PolicyEffect:
    policy: str
    interventions: list[dict[str, Any]]
    prompts: int
    secondary_sinks: int  # in the baseline scan
    still_flagged: int  # of those, flagged as secondary again with the policy applied
    mass_before: list[float | None]  # per layer: mean attention mass on the baseline's secondary sinks
    mass_after: list[float | None]
    primary_mass_change: float | None = None  # the primary sink's mass summed over layers, with vs without
    perplexity_before: float | None = None
    perplexity_after: float | None = None

    @property
    def mass_change(self) -> float | None:
        """Relative change of the secondary sinks' mass, summed over layers (None without sinks)."""
        pairs = [(b, a) for b, a in zip(self.mass_before, self.mass_after) if b is not None and a is not None]
        before = sum(b for b, _ in pairs)
        return None if not pairs or before == 0 else sum(a for _, a in pairs) / before - 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mass_change": self.mass_change}


def sink_mass_by_layer(before: ScanResult, after: ScanResult) -> tuple[list[float | None], list[float | None]]:
    """Mean sink score per layer at the baseline's secondary-sink positions, in both scans."""
    num_layers = before.model.num_layers
    sums = np.zeros((2, num_layers))
    counts = np.zeros(num_layers)
    for base, edited in zip(before.prompts, after.prompts):
        if base.trace.sink_scores is None or edited.trace.sink_scores is None:
            raise ValueError("sink mass needs scans with attention scores")
        positions = [e.position for e in base.detection.events if e.kind == "secondary" and not e.is_reference]
        if not positions:
            continue
        for column, scan in enumerate((base, edited)):
            scores = scan.trace.sink_scores[:, positions]  # [L, S], NaN where too few queries see the key
            sums[column] += np.nansum(scores, axis=1)
        counts += np.sum(~np.isnan(base.trace.sink_scores[:, positions]), axis=1)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return ([None if math.isnan(x) else round(float(x), 6) for x in mean[0]],
            [None if math.isnan(x) else round(float(x), 6) for x in mean[1]])


def primary_mass_change(before: ScanResult, after: ScanResult) -> float | None:
    """Relative change of the attention the primary sink (each prompt's reference) receives, over all layers."""
    totals = np.zeros(2)
    for base, edited in zip(before.prompts, after.prompts):
        reference = base.detection.reference
        for column, scan in enumerate((base, edited)):
            totals[column] += np.nansum(scan.trace.sink_scores[:, reference])
    return None if totals[0] == 0 else round(float(totals[1] / totals[0] - 1), 6)


def still_flagged(before: ScanResult, after: ScanResult) -> tuple[int, int]:
    """(baseline secondary sinks, how many of them the detector flags as secondary again)."""
    total = kept = 0
    for base, edited in zip(before.prompts, after.prompts):
        again = {e.position for e in edited.detection.events if e.kind == "secondary"}
        for event in base.detection.events:
            if event.kind == "secondary" and not event.is_reference:
                total += 1
                kept += event.position in again
    return total, kept


def perplexity(model: HFSinkModel, prompts: Sequence[list[int]], policy: Policy | None = None,
               profile: SinkProfile | None = None) -> float:
    from sinkguard.engines.hf.likelihood import mean_loglik

    return math.exp(-mean_loglik(model, prompts, policy, profile))


def policy_effect(before: ScanResult, after: ScanResult, policy: Policy, model: HFSinkModel | None = None,
                  profile: SinkProfile | None = None, held_out: Sequence[list[int]] = ()) -> PolicyEffect:
    """Compare a baseline scan with the same prompts scanned under ``policy``; with ``model`` and
    ``held_out`` prompts, also the perplexity of those prompts without and with it."""
    mass_before, mass_after = sink_mass_by_layer(before, after)
    sinks, kept = still_flagged(before, after)
    effect = PolicyEffect(policy.name, [spec.model_dump() for spec in policy.interventions], len(before.prompts),
                          sinks, kept, mass_before, mass_after, primary_mass_change(before, after))
    if model is not None and held_out:
        effect.perplexity_before = round(perplexity(model, held_out), 4)
        effect.perplexity_after = round(perplexity(model, held_out, policy, profile), 4)
    return effect
