"""Per-layer statistics of one sequence: what every engine adapter records and the detector reads.

An adapter (transformers, vLLM) calls :func:`layer_statistics` once per decoder layer with that
layer's output hidden states and MLP output; nothing larger than ``T x hidden`` for one layer is
ever held. The result is a few ``[L, T]`` arrays, from which detection, formation attribution and
profiles are computed without touching the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class LayerStatistics:
    """Statistics of one layer's output for T tokens against R reference candidates."""

    hidden_norm: torch.Tensor  # [T]  ||h_t||
    hidden_cos: torch.Tensor  # [R, T]  cos(h_t, ref_r)
    mlp_norm: torch.Tensor  # [T]  ||mlp_t||
    mlp_cos: torch.Tensor  # [R, T]  cos(mlp_t, ref_r): the forming signal


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def layer_statistics(
    hidden: torch.Tensor, mlp_out: torch.Tensor, references: torch.Tensor, unit_references: bool = False
) -> LayerStatistics:
    """Norms and cosines of ``hidden`` [T, d] and ``mlp_out`` [T, d] against ``references`` [R, d].

    Computed in float32 whatever the model dtype: cosines near the 0.9 threshold must not flip
    because of bf16 rounding. ``unit_references=True`` skips normalising references that are
    already unit vectors (the online path calls this for every layer of every step).
    """
    hidden = hidden.float()
    mlp_out = mlp_out.float()
    refs = references if unit_references else _unit(references.float())
    hidden_norm = hidden.norm(dim=-1)
    mlp_norm = mlp_out.norm(dim=-1)
    hidden_cos = (refs @ hidden.T) / hidden_norm.clamp_min(1e-12)
    mlp_cos = (refs @ mlp_out.T) / mlp_norm.clamp_min(1e-12)
    return LayerStatistics(hidden_norm, hidden_cos, mlp_norm, mlp_cos)


@dataclass
class SequenceTrace:
    """Everything recorded for one sequence, stacked over layers (numpy, float32).

    ``hidden_cos`` / ``mlp_cos`` hold one row per reference candidate (the first R positions for
    a per-prompt reference, or one row for a profile's stored reference direction).
    ``ref_hidden`` / ``ref_mlp`` keep the candidates' own vectors per layer for calibration.
    ``head_scores`` is the attention sink score per layer, head and key (NaN where a key has
    too few voting queries), or None when attention was not computed.
    """

    token_ids: list[int]
    hidden_norm: np.ndarray  # [L, T]
    hidden_cos: np.ndarray  # [R, L, T]
    mlp_norm: np.ndarray  # [L, T]
    mlp_cos: np.ndarray  # [R, L, T]
    ref_hidden: np.ndarray | None = None  # [R, L, d]
    ref_mlp: np.ndarray | None = None  # [R, L, d]
    head_scores: np.ndarray | None = None  # [L, H, T]
    reference_from_profile: bool = False
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.hidden_norm.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.hidden_norm.shape[1])

    @property
    def sink_scores(self) -> np.ndarray | None:
        """Head-averaged sink score [L, T] (NaN where a key has too few votes)."""
        if self.head_scores is None:
            return None
        return self.head_scores.mean(axis=1)


def stack_layers(per_layer: list[LayerStatistics]) -> dict[str, np.ndarray]:
    """Stack a list of per-layer statistics into the ``[L, T]`` / ``[R, L, T]`` arrays."""
    return {
        "hidden_norm": torch.stack([s.hidden_norm for s in per_layer]).cpu().numpy(),
        "hidden_cos": torch.stack([s.hidden_cos for s in per_layer], dim=1).cpu().numpy(),
        "mlp_norm": torch.stack([s.mlp_norm for s in per_layer]).cpu().numpy(),
        "mlp_cos": torch.stack([s.mlp_cos for s in per_layer], dim=1).cpu().numpy(),
    }
