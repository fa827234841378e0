"""Publication-style figures of a scan (matplotlib, Agg backend, PNG).

1. ``sink_score_heatmap.png``: attention sink score, layer x position, for the prompt with the
   most secondary sinks (log colour scale; secondary sinks marked on the x axis).
2. ``sink_levels.png``: how many sinks were born at each layer with each lifetime.
3. ``sink_score_curves.png``: sink score by layer of each secondary sink vs the reference.
4. ``mass_by_layer.png``: mean sink score of the primary sink vs secondary sinks per layer.
5. ``formation.png``: the forming MLP's output norm (relative to the median token) per layer,
   sink tokens vs all tokens, and the reference's hidden-norm ratio with the active window.
6. ``policy_effect.png`` (``scan --policy``): attention mass on the baseline's secondary sinks by
   layer, without and with the policy, side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sinkguard.offline.effects import PolicyEffect
    from sinkguard.offline.report import PromptScan, ScanResult

PRIMARY_COLOR = "#1f3b73"
SECONDARY_COLOR = "#d1495b"
NOISE_COLOR = "#9a9a9a"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 120, "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _showcase(result: ScanResult) -> PromptScan:
    return max(result.prompts, key=lambda p: (len(p.as_result.secondary), -p.index))


def heatmap(result: ScanResult, path: Path) -> Path | None:
    from matplotlib.colors import LogNorm

    prompt = _showcase(result)
    scores = prompt.trace.sink_scores
    if scores is None:
        return None
    plt = _plt()
    length = scores.shape[1]
    fig, ax = plt.subplots(figsize=(min(14, 4 + length / 40), 4.5))
    data = np.clip(np.nan_to_num(scores, nan=np.nan), 1e-4, 1)
    image = ax.imshow(data, aspect="auto", origin="lower", cmap="magma", norm=LogNorm(1e-3, 1),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="sink score (mean attention received)")
    for event in prompt.as_result.secondary:
        ax.axvline(event.position, color=SECONDARY_COLOR, lw=0.6, alpha=0.6)
    ax.set_xlabel(f"key position (secondary sinks marked; last {result.config.attention.min_votes - 1} "
                  "positions have too few voting queries)")
    ax.set_ylabel("layer")
    ax.set_title(f"{result.model.name}: sink score by layer and position ({prompt.source})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sink_levels(result: ScanResult, path: Path) -> Path:
    plt = _plt()
    layers = result.model.num_layers
    grid = np.zeros((layers + 1, layers))
    for row in result.summary.sink_levels:
        grid[row["lifetime"], row["birth_layer"]] += row["count"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    shown = np.ma.masked_equal(grid, 0)
    image = ax.imshow(shown, origin="lower", cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="tokens")
    for lifetime, birth in zip(*np.nonzero(grid)):
        ax.text(birth, lifetime, int(grid[lifetime, birth]), ha="center", va="center", color="white", fontsize=7)
    primary_min, noise_max = result.config.detector.lifetime.thresholds(layers)
    ax.axhline(noise_max + 0.5, color=NOISE_COLOR, ls="--", lw=0.8, label=f"noise <= {noise_max}")
    ax.axhline(primary_min - 0.5, color=PRIMARY_COLOR, ls="--", lw=0.8, label=f"primary >= {primary_min}")
    ax.set_xlabel("birth layer")
    ax.set_ylabel("lifetime (layers)")
    ax.set_title("sink levels (non-reference tokens)")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def score_curves(result: ScanResult, path: Path, limit: int = 24) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    layers = np.arange(result.model.num_layers)
    for prompt in result.prompts:
        scores = prompt.trace.sink_scores
        if scores is None:
            return None
        if plotted == 0:
            ax.plot(layers, scores[:, prompt.detection.reference], color=PRIMARY_COLOR, lw=2,
                    label=f"reference (pos {prompt.detection.reference}, {prompt.source})")
        for event in prompt.as_result.secondary:
            if plotted >= limit:
                break
            ax.plot(layers, scores[:, event.position], color=SECONDARY_COLOR, alpha=0.45, lw=1,
                    label="secondary sinks" if plotted == 0 else None)
            plotted += 1
    ax.set_xlabel("layer")
    ax.set_ylabel("sink score")
    ax.set_title(f"sink score by layer: {plotted} secondary sinks vs the primary sink")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def mass_by_layer(result: ScanResult, path: Path) -> Path | None:
    summary = result.summary
    primary = np.asarray(summary.primary_score_by_layer, dtype=float)
    if primary.size == 0 or np.all(np.isnan(primary)):
        return None
    secondary = np.asarray(summary.secondary_score_by_layer, dtype=float)
    plt = _plt()
    layers = np.arange(len(primary))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.4
    ax.bar(layers - width / 2, primary, width, color=PRIMARY_COLOR, label="primary sink (reference)")
    ax.bar(layers + width / 2, np.nan_to_num(secondary), width, color=SECONDARY_COLOR,
           label="secondary sink (mean per sink)")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention received")
    ax.set_title(f"primary vs secondary sink mass by layer ({summary.num_prompts} prompts)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def formation(result: ScanResult, path: Path) -> Path:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    layers = np.arange(result.model.num_layers)
    sink_ratios, all_ratios, ref_ratios = [], [], []
    for prompt in result.prompts:
        median = np.median(prompt.trace.mlp_norm, axis=1, keepdims=True)
        ratio = prompt.trace.mlp_norm / np.maximum(median, 1e-12)
        all_ratios.append(np.median(ratio, axis=1))
        ref_ratios.append(prompt.detection.norm_ratio)
        for event in prompt.as_result.secondary:
            sink_ratios.append(ratio[:, event.position])
    if sink_ratios:
        stack = np.stack(sink_ratios)
        left.plot(layers, np.median(stack, axis=0), color=SECONDARY_COLOR, lw=2, label="secondary sinks (median)")
        left.fill_between(layers, np.percentile(stack, 10, axis=0), np.percentile(stack, 90, axis=0),
                          color=SECONDARY_COLOR, alpha=0.2, label="10-90%")
    left.plot(layers, np.median(np.stack(all_ratios), axis=0), color=NOISE_COLOR, label="median token")
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("MLP output norm / median token's")
    left.set_title("formation: which MLP writes the sink")
    left.legend(fontsize=7)
    right.plot(layers, np.median(np.stack(ref_ratios), axis=0), color=PRIMARY_COLOR, lw=2)
    right.set_yscale("log")
    for layer in result.summary.window_layers:
        right.axvspan(layer - 0.5, layer + 0.5, color=PRIMARY_COLOR, alpha=0.08, lw=0)
    right.axhline(result.config.detector.window_min_norm_ratio, color=NOISE_COLOR, ls="--", lw=0.8)
    right.set_xlabel("layer (shaded: active window)")
    right.set_ylabel("reference norm / median token's")
    right.set_title("primary sink hidden-state norm")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_scan(result: ScanResult, out_dir: Path | str, figures: bool = True) -> list[Path]:
    """A scan's published output: ``report.json`` and (``figures``) every figure; the written paths."""
    return result.save(out_dir) + (write_scan_figures(result, Path(out_dir)) if figures else [])


def write_scan_figures(result: ScanResult, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    made = [
        heatmap(result, out_dir / "sink_score_heatmap.png"),
        sink_levels(result, out_dir / "sink_levels.png"),
        score_curves(result, out_dir / "sink_score_curves.png"),
        mass_by_layer(result, out_dir / "mass_by_layer.png"),
        formation(result, out_dir / "formation.png"),
    ]
    return [p for p in made if p is not None]


def policy_effect(effect: PolicyEffect, path: Path) -> Path:
    """Secondary-sink attention mass by layer without and with a policy (same tokens)."""
    plt = _plt()
    before = np.array([np.nan if x is None else x for x in effect.mass_before], dtype=float)
    after = np.array([np.nan if x is None else x for x in effect.mass_after], dtype=float)
    layers = np.arange(len(before))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.4
    ax.bar(layers - width / 2, np.nan_to_num(before), width, color=NOISE_COLOR, label="without policy")
    ax.bar(layers + width / 2, np.nan_to_num(after), width, color=SECONDARY_COLOR, label=f"with '{effect.policy}'")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention received")
    flagged = f"{effect.still_flagged}/{effect.secondary_sinks} still flagged"
    ppl = ("" if effect.perplexity_before is None else
           f"; perplexity {effect.perplexity_before:.3f} -> {effect.perplexity_after:.3f}")
    ax.set_title(f"secondary-sink mass by layer ({effect.prompts} prompts; {flagged}{ppl})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
