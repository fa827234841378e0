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
    """Statistics of one layer's output for T tokens against R unit reference directions.

    Cosines are formed later, for all layers at once (:func:`stack_layers`): the online path
    runs this for every layer of every engine step, where each extra tiny op costs more than its
    arithmetic.
    """

    hidden_norm: torch.Tensor  # [T]  ||h_t||
    hidden_dot: torch.Tensor  # [R, T]  h_t . ref_r
    mlp_norm: torch.Tensor  # [T]  ||mlp_t||
    mlp_dot: torch.Tensor  # [R, T]  mlp_t . ref_r: the forming signal


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def layer_statistics(
    hidden: torch.Tensor, mlp_out: torch.Tensor, references: torch.Tensor, unit_references: bool = False
) -> LayerStatistics:
    """Norms of ``hidden`` [..., T, d] and ``mlp_out`` and their dot products with ``references`` [..., R, d].

    Leading dimensions broadcast. For a whole decode step at once, :func:`pair_statistics` does
    the same with fewer passes.

    Computed in float32 whatever the model dtype: cosines near the 0.9 threshold must not flip
    because of bf16 rounding. ``unit_references=True`` skips normalising references that are
    already unit vectors and float32.
    """
    hidden = hidden.float()
    mlp_out = mlp_out.float()
    refs = references if unit_references else unit_rows(references.float())
    return LayerStatistics(
        hidden_norm=torch.linalg.vector_norm(hidden, dim=-1),
        hidden_dot=torch.matmul(refs, hidden.transpose(-1, -2)),
        mlp_norm=torch.linalg.vector_norm(mlp_out, dim=-1),
        mlp_dot=torch.matmul(refs, mlp_out.transpose(-1, -2)),
    )


def chunked_layer_statistics(
    residual: torch.Tensor, mlp_out: torch.Tensor, unit_references: torch.Tensor, chunk_tokens: int
) -> LayerStatistics:
    """:func:`layer_statistics` of ``residual + mlp_out`` computed ``chunk_tokens`` rows at a time, so
    the float32 temporaries stay ``chunk_tokens x d`` however many tokens a step carries."""
    parts = [layer_statistics(residual[i:i + chunk_tokens] + mlp_out[i:i + chunk_tokens], mlp_out[i:i + chunk_tokens],
                              unit_references, unit_references=True)
             for i in range(0, max(int(mlp_out.shape[0]), 1), chunk_tokens)]
    if len(parts) == 1:
        return parts[0]
    return LayerStatistics(
        hidden_norm=torch.cat([q.hidden_norm for q in parts]),
        hidden_dot=torch.cat([q.hidden_dot for q in parts], dim=-1),
        mlp_norm=torch.cat([q.mlp_norm for q in parts]),
        mlp_dot=torch.cat([q.mlp_dot for q in parts], dim=-1),
    )


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
    attention_windows: list[int | None] | None = None  # per layer: sliding window (None: full causal)
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
    """Stack per-layer statistics into ``[L, T]`` norms and ``[R, L, T]`` cosines (numpy)."""
    hidden_norm = torch.stack([s.hidden_norm for s in per_layer])
    mlp_norm = torch.stack([s.mlp_norm for s in per_layer])
    hidden_dot = torch.stack([s.hidden_dot for s in per_layer], dim=1)
    mlp_dot = torch.stack([s.mlp_dot for s in per_layer], dim=1)
    return {
        "hidden_norm": hidden_norm.cpu().numpy(),
        "hidden_cos": (hidden_dot / hidden_norm.clamp_min(1e-12)).cpu().numpy(),
        "mlp_norm": mlp_norm.cpu().numpy(),
        "mlp_cos": (mlp_dot / mlp_norm.clamp_min(1e-12)).cpu().numpy(),
    }


def pair_statistics(pair: torch.Tensor, reference_columns: torch.Tensor) -> dict[str, np.ndarray]:
    """Norms and cosines of a whole step at once from ``pair`` = ``[L, 2, T, d]`` float32 (per
    layer: MLP outputs, then hidden states) against unit references as columns ``[L, d, 1]``.

    Two passes over the activations (a norm and one batched matrix-vector product) instead of
    four ops per layer; same numpy layout as :func:`stack_layers`.
    """
    num_layers, _, tokens, dim = pair.shape
    norms = torch.linalg.vector_norm(pair, dim=-1)  # [L, 2, T]
    dots = torch.bmm(pair.view(num_layers, 2 * tokens, dim), reference_columns).view(num_layers, 2, tokens)
    cosines = (dots / norms.clamp_min(1e-12)).numpy(force=True)
    norms = norms.numpy(force=True)
    return {"hidden_norm": norms[:, 1], "hidden_cos": cosines[None, :, 1], "mlp_norm": norms[:, 0],
            "mlp_cos": cosines[None, :, 0]}


def captured_statistics(captured: torch.Tensor) -> dict[str, np.ndarray]:
    """:func:`pair_statistics`'s layout from statistics an engine captured per layer inside its model,
    ``[L, T, 4]`` float32 columns (MLP norm, MLP . reference, hidden norm, hidden . reference)."""
    values = captured.numpy(force=True)
    mlp_norm, mlp_dot, hidden_norm, hidden_dot = (values[..., i] for i in range(4))
    return {"hidden_norm": hidden_norm, "hidden_cos": (hidden_dot / np.maximum(hidden_norm, 1e-12))[None],
            "mlp_norm": mlp_norm, "mlp_cos": (mlp_dot / np.maximum(mlp_norm, 1e-12))[None]}
