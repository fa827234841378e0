"""Markdown and terminal summaries of an evaluation comparison and of a live A/B report."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def comparison_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """One row per task and arm: metric, value, effect vs control with its interval, p, Holm p, significant."""
    rows = []
    for name, task in comparison["tasks"].items():
        for arm, s in task["arms"].items():
            if "perplexity" in s:
                metric, value = "perplexity", s["perplexity"]
                effect = s.get("nll_per_token_diff")
                effect_text = "-" if effect is None else \
                    f"{effect['estimate']:+.4f} [{effect['low']:+.4f}, {effect['high']:+.4f}] nats/token"
            else:
                metric, value = "accuracy", s["accuracy"]
                effect_text = "-" if "accuracy_diff" not in s else \
                    f"{s['accuracy_diff']:+.3f} ({s['discordant']['only_arm']} vs {s['discordant']['only_control']} " \
                    "discordant)"
            rows.append([name, arm, metric, format_value(value), effect_text, format_value(s.get("pvalue")),
                         format_value(s.get("pvalue_holm")), format_value(s.get("significant"))])
    return rows


HEADER = ["task", "arm", "metric", "value", "effect vs control", "p", "p (Holm)", "significant"]


def comparison_markdown(comparison: dict[str, Any]) -> str:
    lines = [f"Control arm: `{comparison['control']}`; {comparison['tests']} tests, Holm-corrected at "
             f"alpha {comparison['alpha']}.", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(comparison)]
    lines += ["", *[f"**Warning:** {w}" for w in comparison.get("warnings", [])]] if comparison.get("warnings") else []
    latency = comparison.get("latency", {})
    if any(v.get("ttft_ms") for v in latency.values()):
        lines += ["", "| arm | requests | TTFT mean (ms) | TPOT mean (ms) |", "|---|---|---|---|"]
        for arm, v in latency.items():
            ttft = "-" if not v.get("ttft_ms") else f"{v['ttft_ms']['mean']:.1f}"
            tpot = "-" if not v.get("tpot_ms") else f"{v['tpot_ms']['mean']:.1f}"
            lines.append(f"| {arm} | {v['requests']} | {ttft} | {tpot} |")
    return "\n".join(lines) + "\n"


def print_comparison(comparison: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title=f"arms vs control '{comparison['control']}' (paired)", title_justify="left")
    for column in HEADER:
        table.add_column(column)
    for row in comparison_rows(comparison):
        table.add_row(*row)
    console = console or Console()
    console.print(table)
    for warning in comparison.get("warnings", []):
        console.print(f"[bold red]warning:[/] {warning}")


def print_ab_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if not report.get("arms"):
        console.print("no requests in the log")
        return
    table = Table(title=f"live A/B: {report['requests']} requests, control '{report['control']}'", title_justify="left")
    for column in ("arm", "metric", "arm mean", "difference [95% CI]", "p (Holm)", "always-valid p", "significant"):
        table.add_column(column)
    for arm, summary in report["arms"].items():
        excluded = [f"{summary[key]} {label}" for key, label in (("errors", "failed"), ("abandoned", "abandoned"),
                    ("not_applied", "served without the arm's policy")) if summary.get(key)]
        note = f" ({', '.join(excluded)}: not compared)" if excluded else ""
        table.add_row(arm, "requests", f"{summary['requests']}{note}", "", "", "", "")
        for metric, result in report["comparisons"].get(arm, {}).items():
            diff = "-" if result["difference"] is None else \
                f"{result['difference']:+.4g} [{result['low']:+.4g}, {result['high']:+.4g}]"
            table.add_row("", metric, format_value(summary.get(metric)), diff, format_value(result.get("pvalue_holm")),
                          format_value(result.get("always_valid_pvalue")), format_value(result.get("significant")))
    console.print(table)
