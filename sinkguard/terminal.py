"""Readable terminal summaries of scans and profiles (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sinkguard.profile import SinkProfile
    from sinkguard.scan import ScanResult


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
    cal = d["calibration"]
    console.print(f"calibrated on {cal['num_prompts']} prompts / {cal['num_tokens']} tokens; reference "
                  f"direction consistency min {cal['reference_consistency_min']}, mean "
                  f"{cal['reference_consistency_mean']}")
