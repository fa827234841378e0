"""Readable terminal summaries of scans and profiles (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sinkguard.core.confirmation import Agreement
    from sinkguard.core.profile import SinkProfile
    from sinkguard.core.settings import ConfirmationConfig
    from sinkguard.offline.effects import PolicyEffect
    from sinkguard.offline.report import ScanResult


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def print_scan_summary(result: ScanResult, console: Console | None = None) -> None:
    console = console or Console()
    s = result.summary
    primary_min, noise_max = result.config.detector.lifetime.thresholds(s.num_layers)
    console.print(f"[bold]{result.model.name}[/] ({result.model.architecture}, {s.num_layers} layers): "
                  f"{s.num_prompts} prompts, {s.num_tokens} tokens, reference = per-{result.reference_mode}")
    console.print(f"active window layers: {s.window_layers}   lifetime rule: primary >= {primary_min}, "
                  f"noise <= {noise_max}")
    kinds = ", ".join(f"{k} {v}" for k, v in s.kinds.items())
    console.print(f"flagged tokens: {kinds}")
    if not s.kinds.get("secondary"):
        console.print("[yellow]no secondary sinks found[/]")

    levels = Table(title="sink levels (secondary)", title_justify="left")
    for col in ("birth layer", "lifetime", "count"):
        levels.add_column(col, justify="right")
    for row in s.sink_levels:
        if row["kind"] == "secondary":
            levels.add_row(str(row["birth_layer"]), str(row["lifetime"]), str(row["count"]))
    if levels.row_count:
        console.print(levels)

    if s.tokens:
        console.print("tokens that become secondary sinks: " + ", ".join(
            f"{row['token']!r} x{row['count']}" for row in s.tokens[:10]))
    for row in s.forming_layers:
        console.print(f"formed by the layer-{row['layer']} MLP: {row['count']} sinks, output "
                      f"{row['mlp_norm_ratio_median']:.1f}x the median token's, cos with the reference "
                      f"{row['mlp_cos_median']:+.3f} (medians)")
    primary = np.asarray(s.primary_score_by_layer, dtype=float)
    secondary = np.asarray(s.secondary_score_by_layer, dtype=float)
    if primary.size and np.isfinite(secondary).any():
        mass = Table(title="mean attention received by layer (where secondary sinks exist)", title_justify="left")
        mass.add_column("layer", justify="right")
        mass.add_column("primary", justify="right")
        mass.add_column("secondary (per sink)", justify="right")
        for layer in np.flatnonzero(np.isfinite(secondary)):
            mass.add_row(str(layer), _fmt(primary[layer]), _fmt(secondary[layer]))
        console.print(mass)
    if result.agreement is not None:
        print_agreement(result.agreement, result.config.confirmation, console)


def print_agreement(result: Agreement, config: ConfirmationConfig, console: Console) -> None:
    """How hidden-state flags agree with attention-confirmed sinks (one line + per-kind table)."""
    agreement, criteria = result.to_dict(), config.model_dump()
    colour = "green" if result.meets(config) else "red"
    console.print(
        f"agreement with attention: [{colour}]recall {_fmt(agreement['recall'])}[/] of "
        f"{agreement['strong_attention_sinks']} strong sinks (>= {criteria['strong_ratio']:g}x uniform for >= "
        f"{criteria['strong_layers']} layers), [{colour}]{_fmt(agreement['unexplained_sink_flags_per_256_tokens'])} "
        f"unexplained sink flags per 256 tokens[/] (no sink >= {criteria['weak_ratio']:g}x for >= "
        f"{criteria['weak_layers']} layers within {criteria['match_distance']}); targets: recall >= "
        f"{criteria['target_recall']}, <= {criteria['target_unexplained_per_256']}")
    table = Table(title="flags by kind", title_justify="left")
    for column in ("kind", "flags", "unexplained", "precision"):
        table.add_column(column, justify="right")
    for kind, count in agreement["flags"].items():
        table.add_row(kind, str(count), str(agreement["unexplained_flags"][kind]), _fmt(agreement["precision"][kind]))
    console.print(table)


def print_profile_summary(profile: SinkProfile, console: Console | None = None) -> None:
    console = console or Console()
    d = profile.describe()
    console.print(f"[bold]sink profile[/] for {d['model']} (fingerprint {d['fingerprint']}...)")
    console.print(f"reference position {d['reference_position']}, window layers {d['window_layers']}")
    for row in d["forming_layers"]:
        console.print(f"forming MLP layer {row['layer']}: {row['count']} sinks, ratio median "
                      f"{row['mlp_norm_ratio_median']:.1f} (p10 {row['mlp_norm_ratio_p10']:.1f}), "
                      f"online alert at {row['alert_mlp_norm_ratio']:.1f}x")
    console.print(f"heads where secondary sinks draw > threshold: {len(d['sink_heads'])}")
    detector, validation = d["detector"], d["validation"]
    colour = {"validated": "green", "no_secondary_sinks": "green"}.get(validation["status"], "red")
    console.print(f"detector: |cos| > {detector['cos_threshold']}, norm >= {detector['min_norm_ratio']}x median, "
                  f"forming MLP >= {detector['min_formation_ratio']}x median, window {detector['window_rule']}"
                  f" ({detector['window_min_norm_ratio']}x); [{colour}]{validation['status']}[/]: "
                  f"{validation.get('message', '')}")
    cal = d["calibration"]
    console.print(f"calibrated on {cal['num_prompts']} prompts / {cal['num_tokens']} tokens; reference "
                  f"direction consistency min {cal['reference_consistency_min']}, mean "
                  f"{cal['reference_consistency_mean']}")


def print_policy_effect(effect: PolicyEffect, console: Console | None = None) -> None:
    """Before/after table of one policy: secondary-sink mass per layer, flags, perplexity."""
    console = console or Console()
    table = Table(title=f"policy '{effect.policy}': secondary-sink attention mass by layer "
                        f"({effect.prompts} prompts, {effect.secondary_sinks} sinks)")
    table.add_column("layer", justify="right")
    table.add_column("without", justify="right")
    table.add_column("with", justify="right")
    table.add_column("change", justify="right")
    for layer, (before, after) in enumerate(zip(effect.mass_before, effect.mass_after)):
        if before is None or after is None:
            continue
        change = "-" if before == 0 else f"{after / before - 1:+.0%}"
        table.add_row(str(layer), _fmt(before, 4), _fmt(after, 4), change)
    console.print(table)
    total = "-" if effect.mass_change is None else f"{effect.mass_change:+.1%}"
    console.print(f"secondary-sink mass over all layers: {total}; still flagged as secondary sinks: "
                  f"{effect.still_flagged}/{effect.secondary_sinks}")
    if effect.perplexity_before is not None:
        console.print(f"perplexity: {effect.perplexity_before:.4f} -> {effect.perplexity_after:.4f}")
