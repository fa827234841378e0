"""Where attention redistribution helps: calibrate the heads and layers an ACT policy acts on.

Objective (stated, as ACT states it): the mean next-token log-likelihood of calibration prompts
under teacher forcing. Every candidate ``(layer, head)`` is tried alone with the given
``attention_redistribution`` setting; candidates that raise the objective by more than
``min_gain`` nats/token (default 0.002: every kept head costs time in every step) are then added
greedily, best first, each kept only if the combination improves on the best so far by that much.
The result says what was tried, what each candidate did alone, what was kept, and the objective
on held-out prompts (never used for the choice) before and after.
ACT's public selection code selects nothing on some models: here an empty selection is a result
(reported as such), not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sinkguard.engines.hf.likelihood import mean_loglik
from sinkguard.interventions.policy import Policy
from sinkguard.interventions.specs import AttentionRedistribution

if TYPE_CHECKING:
    from sinkguard.core.profile import SinkProfile
    from sinkguard.engines.hf.runner import HFSinkModel


@dataclass
class Candidate:
    layer: int
    head: int
    gain: float  # objective change with this head alone (nats/token)
    kept: bool = False


@dataclass
class HeadSelection:
    setting: dict[str, Any]  # the attention_redistribution parameters tried
    objective: str
    baseline: float
    selected: float  # objective with every kept head
    held_out_baseline: float | None
    held_out_selected: float | None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def kept(self) -> list[Candidate]:
        return [c for c in self.candidates if c.kept]

    def policy(self, name: str) -> Policy:
        """The selection as a policy: one attention_redistribution per layer, on its kept heads."""
        by_layer: dict[int, list[int]] = {}
        for c in self.kept:
            by_layer.setdefault(c.layer, []).append(c.head)
        return Policy(name=name, interventions=[
            AttentionRedistribution(**{**self.setting, "layers": [layer], "heads": sorted(heads)})
            for layer, heads in sorted(by_layer.items())])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kept": [asdict(c) for c in self.kept]}


def _policy_for(setting: AttentionRedistribution, heads: list[tuple[int, int]]) -> Policy:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return Policy(name="candidate", interventions=[setting.model_copy(update={"layers": [layer], "heads": sorted(hs)})
                                                   for layer, hs in sorted(by_layer.items())])


def select_heads(model: HFSinkModel, profile: SinkProfile, calibration: Sequence[list[int]],
                 setting: AttentionRedistribution | None = None, layers: Sequence[int] | None = None,
                 held_out: Sequence[list[int]] = (), min_gain: float = 2e-3, progress: bool = True) -> HeadSelection:
    """Greedy head selection for ``setting`` (default beta 0) on ``calibration`` prompts (token ids).

    ``layers``: candidate layers (default: every layer above the first forming layer, where
    secondary sinks can exist).
    """
    setting = setting or AttentionRedistribution(beta=0.0)
    if layers is None:
        first = min((f.layer for f in profile.meta.forming_layers), default=0)
        layers = range(first + 1, profile.model.num_layers)
    pairs = [(layer, head) for layer in layers for head in range(profile.model.num_heads)]
    baseline = mean_loglik(model, calibration)
    iterator: Any = pairs
    if progress:
        from rich.progress import track

        iterator = track(pairs, description=f"trying {len(pairs)} heads", transient=True)
    candidates = [Candidate(layer, head, mean_loglik(model, calibration, _policy_for(setting, [(layer, head)]),
                                                     profile) - baseline) for layer, head in iterator]
    best, chosen = baseline, []
    for candidate in sorted(candidates, key=lambda c: -c.gain):
        if candidate.gain <= min_gain:
            break
        trial = mean_loglik(model, calibration, _policy_for(setting, [*chosen, (candidate.layer, candidate.head)]),
                            profile)
        if trial > best + min_gain:
            best, candidate.kept = trial, True
            chosen.append((candidate.layer, candidate.head))
    held_base = held_sel = None
    if held_out:
        held_base = mean_loglik(model, held_out)
        held_sel = mean_loglik(model, held_out, _policy_for(setting, chosen), profile) if chosen else held_base
    params = setting.model_dump(exclude={"layers", "heads"})
    return HeadSelection(params, "mean next-token log-likelihood (nats/token), teacher forcing", baseline, best,
                         held_base, held_sel, candidates)
