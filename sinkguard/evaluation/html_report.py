"""Self-contained HTML reports (plotly) of an evaluation run and of a live A/B report.

One file, readable offline: plotly.js is inlined once and every figure is a div drawn by it, so a
report can be mailed or archived and still opens without a network. A small script at the top
shows any JavaScript error in the page itself (and lets a headless browser test find them).

Evaluation report: the run's configuration; per task and arm the metric with its interval (NLL per
token vs the control with a paired bootstrap interval, accuracy with Wilson intervals) and p /
Holm p; sink statistics per arm (secondary sinks active per layer, interventions per kind, from
the server's records); latency distributions (TTFT, TPOT); retrieval accuracy by context length.
A/B report: per-arm metrics, the difference vs the control with its bootstrap interval, p, Holm p
and the always-valid mSPRT p.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sinkguard.evaluation.ab_report import METRICS
from sinkguard.evaluation.runner import EvalRun
from sinkguard.evaluation.summary import HEADER, comparison_rows, format_value

_ERROR_TRAP = """<script>
window.sinkguardErrors = [];
function sinkguardShowErrors() {
  var box = document.getElementById("sinkguard-errors");
  if (box && window.sinkguardErrors.length) {
    box.textContent = window.sinkguardErrors.join("\\n");
    box.hidden = false;
  }
}
function sinkguardError(message) {
  window.sinkguardErrors.push("JavaScript error: " + message);
  sinkguardShowErrors();
}
window.addEventListener("error", function (e) { sinkguardError(e.message); });
window.addEventListener("unhandledrejection", function (e) {
  sinkguardError(e.reason && e.reason.message || e.reason);
});
document.addEventListener("DOMContentLoaded", sinkguardShowErrors);
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
.note { color: #555; font-size: 0.9rem; }
#sinkguard-errors { color: #a00; background: #fee; padding: 0.5rem; }
</style>"""

CONFIG = {"displaylogo": False, "responsive": True}


def _colors(arms: Sequence[str]) -> dict[str, str]:
    from plotly.colors import qualitative

    return {arm: qualitative.Plotly[i % len(qualitative.Plotly)] for i, arm in enumerate(arms)}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Page:
    """Sections of headings, notes, tables and figures, rendered into one document."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []
        self.figures = 0

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.parts.append(_table(header, rows))

    def figure(self, figure: Any, height: int = 420) -> None:
        figure.update_layout(height=height, template="plotly_white", margin={"t": 60, "b": 50})
        self.figures += 1
        self.parts.append(figure.to_html(full_html=False, include_plotlyjs=False, config=CONFIG,
                                         div_id=f"figure-{self.figures}"))

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title>{_STYLE}{_ERROR_TRAP}<script>{get_plotlyjs()}</script></head><body>"
                f'<pre id="sinkguard-errors" hidden></pre><h1>{html.escape(self.title)}</h1>'
                + "\n".join(self.parts) + "</body></html>\n")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- evaluation report --------------------------------------------------------------------------
def eval_report_html(run: EvalRun, comparison: dict[str, Any]) -> str:
    """The report of an evaluation run and its comparison (:func:`sinkguard.evaluation.compare.compare`)."""
    page = _Page("sinkguard evaluation")
    colors = _colors(run.arms)
    config = dict(run.config)
    config.setdefault("arms", run.arms)
    page.table(["setting", "value"], [["control arm", run.control], *[[k, _config_value(v)] for k, v in config.items()],
                                      *[[f"seconds, arm {a}", f"{s:.1f}"] for a, s in run.seconds.items()]])
    page.heading("Metrics per arm")
    page.note(f"Paired with the control arm '{comparison['control']}'; {comparison['tests']} tests, Holm-corrected at "
              f"alpha {comparison['alpha']}. Intervals are 95%.")
    page.table(HEADER, comparison_rows(comparison))
    for warning in comparison.get("warnings", []):
        page.note(f"Warning: {warning}")
    _metric_figures(page, comparison, colors)
    _sink_section(page, comparison.get("sink_stats"), colors)
    _latency_figure(page, comparison.get("latency", {}), colors)
    _retrieval_figures(page, comparison, colors)
    return page.render()


def _config_value(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _metric_figures(page: _Page, comparison: dict[str, Any], colors: dict[str, str]) -> None:
    from plotly import graph_objects as go

    control = comparison["control"]
    for name, task in comparison["tasks"].items():
        arms = task["arms"]
        figure = go.Figure()
        if task["kind"] == "perplexity":
            effects = {a: s["nll_per_token_diff"] for a, s in arms.items() if s.get("nll_per_token_diff")}
            if not effects:
                continue
            for arm, e in effects.items():
                s = arms[arm]
                figure.add_trace(go.Scatter(
                    x=[arm], y=[e["estimate"]], mode="markers", name=arm, marker={"color": colors[arm], "size": 10},
                    error_y={"type": "data", "symmetric": False, "array": [e["high"] - e["estimate"]],
                             "arrayminus": [e["estimate"] - e["low"]]},
                    hovertext=[f"perplexity {format_value(s.get('perplexity'))}; p {format_value(s.get('pvalue'))}; "
                               f"Holm p {format_value(s.get('pvalue_holm'))}"]))
            figure.add_hline(y=0, line_dash="dash", line_color="#888")
            figure.update_layout(title=f"{name}: NLL per token, arm - control '{control}' (95% paired bootstrap CI)",
                                 yaxis_title="nats / token (lower is better)", showlegend=False)
        else:
            for arm, s in arms.items():
                interval = s.get("accuracy_interval")
                if not _finite(s.get("accuracy")) or not interval:
                    continue
                figure.add_trace(go.Bar(
                    x=[arm], y=[s["accuracy"]], name=arm, marker_color=colors[arm],
                    error_y={"type": "data", "symmetric": False, "array": [interval["high"] - s["accuracy"]],
                             "arrayminus": [s["accuracy"] - interval["low"]]},
                    hovertext=[f"{interval['successes']}/{interval['trials']}{_diff_text(s.get('accuracy_diff_interval'))}"
                               f"; p {format_value(s.get('pvalue'))}; Holm p {format_value(s.get('pvalue_holm'))}"]))
            if not figure.data:
                continue
            figure.update_layout(title=f"{name}: accuracy per arm (95% Wilson CI)", yaxis_title="accuracy",
                                 yaxis_range=[0, 1], showlegend=False)
        page.figure(figure, height=360)


def _diff_text(interval: dict[str, float] | None) -> str:
    if not interval:
        return ""
    low, high = interval["low"], interval["high"]
    return f"; vs control {interval['estimate']:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap)"


def _sink_section(page: _Page, found: dict[str, Any] | None, colors: dict[str, str]) -> None:
    from plotly import graph_objects as go

    page.heading("Sink statistics per arm")
    if not found:
        page.note("No sink statistics in this run (not collected).")
        return
    if not found.get("available"):
        page.note(f"No sink statistics: {found.get('reason', 'not available')}.")
        return
    arms = found["arms"]
    page.note(f"From the server's request records ({found['source']}).")
    kinds = sorted({k for s in arms.values() for k in s["interventions_per_1k_tokens"]})
    page.table(["arm", "records / requests", "tokens scanned", "secondary sinks per 1k tokens",
                *[f"{k} per 1k tokens" for k in kinds], "events not listed"],
               [[arm, f"{s['records']} / {s['requests']}", s["tokens_scanned"],
                 format_value(s["secondary_per_1k_tokens"]),
                 *[format_value(s["interventions_per_1k_tokens"].get(k)) for k in kinds], s["events_dropped"]]
                for arm, s in arms.items()])
    figure = go.Figure()
    for arm, s in arms.items():
        values = s["secondary_active_per_1k_tokens_by_layer"]
        if values:
            figure.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=arm,
                                        line={"color": colors.get(arm)}))
    if figure.data:
        figure.update_layout(title="Secondary sinks active per layer, per 1k scanned tokens (detector flags, "
                                   "not attention mass)", xaxis_title="layer",
                             yaxis_title="active secondary sinks per 1k tokens")
        page.figure(figure)
        page.note(f"Counts {found['label']}.")
    if kinds:
        figure = go.Figure([go.Bar(x=kinds, y=[s["interventions_per_1k_tokens"].get(k) or 0 for k in kinds], name=arm,
                                   marker_color=colors.get(arm)) for arm, s in arms.items()])
        figure.update_layout(title="Interventions applied per 1k scanned tokens, by kind", barmode="group",
                             yaxis_title="edits per 1k tokens")
        page.figure(figure, height=360)


def _latency_figure(page: _Page, latency: dict[str, Any], colors: dict[str, str]) -> None:
    from plotly import graph_objects as go
    from plotly.subplots import make_subplots

    if not any(v.get("ttft_s") for v in latency.values()):
        return
    page.heading("Latency per arm")
    figure = make_subplots(rows=1, cols=2, subplot_titles=("time to first token (ms)", "time per output token (ms)"))
    for arm, v in latency.items():
        for col, key in ((1, "ttft_s"), (2, "tpot_s")):
            if v.get(key):
                figure.add_trace(go.Box(y=[1000 * x for x in v[key]], name=arm, marker_color=colors.get(arm),
                                        boxpoints="all", jitter=0.3, showlegend=col == 1), row=1, col=col)
    figure.update_layout(title="Latency of streamed generations (retrieval and generation tasks)")
    page.figure(figure)


def _retrieval_figures(page: _Page, comparison: dict[str, Any], colors: dict[str, str]) -> None:
    from plotly import graph_objects as go

    for name, task in comparison["tasks"].items():
        if task["kind"] != "retrieval":
            continue
        figure = go.Figure()
        for arm, s in task["arms"].items():
            intervals = s.get("accuracy_by_length_interval") or {}
            lengths = sorted(intervals, key=int)
            if not lengths:
                continue
            y = [s["accuracy_by_length"][n] for n in lengths]
            figure.add_trace(go.Scatter(
                x=[int(n) for n in lengths], y=y, mode="lines+markers", name=arm, line={"color": colors.get(arm)},
                error_y={"type": "data", "symmetric": False,
                         "array": [intervals[n]["high"] - v for n, v in zip(lengths, y)],
                         "arrayminus": [v - intervals[n]["low"] for n, v in zip(lengths, y)]}))
        if figure.data:
            page.heading(f"Retrieval by context length: {name}")
            figure.update_layout(title=f"{name}: accuracy by context length (95% Wilson CI)",
                                 xaxis_title="context length (tokens)", yaxis_title="accuracy",
                                 yaxis_range=[-0.02, 1.02])
            page.figure(figure)


# -- live A/B report ----------------------------------------------------------------------------
def ab_report_html(report: dict[str, Any], rows: Sequence[dict[str, Any]] | None = None,
                   source: str | None = None) -> str:
    """The live A/B report (:func:`sinkguard.evaluation.ab_report.ab_report`); ``rows`` (the log) adds
    per-arm distributions."""
    from plotly import graph_objects as go
    from plotly.subplots import make_subplots

    page = _Page("sinkguard live A/B experiment")
    arms = report.get("arms", {})
    if not arms:
        page.note("No requests in the log.")
        return page.render()
    control = report["control"]
    order = [control, *[a for a in arms if a != control]]
    colors = _colors(order)
    page.table(["setting", "value"], [["log", source or "-"], ["requests", report["requests"]],
                                      ["control arm", control], ["alpha (Holm)", report["alpha"]],
                                      *[[f"arm {a}", f"{arms[a]['requests']} requests ({_assignment(arms[a])}); "
                                         f"{arms[a].get('compared', arms[a]['requests'])} compared"]
                                        for a in order]])
    page.note("Compared: answered requests that ran their arm's policy. Failed and abandoned requests, and those "
              "served without their arm's interventions (the detector was off), are counted, not compared.")
    page.heading("Metrics per arm")
    page.note("Arms see different requests: two-sample differences of means (arm - control) with 95% bootstrap "
              "intervals, permutation p-values, Holm across arms and metrics, and the always-valid mSPRT p-value, "
              "which stays valid however often the report is looked at.")
    table = []
    for arm in order:
        summary = arms[arm]
        for metric in METRICS:
            result = report["comparisons"].get(arm, {}).get(metric, {})
            diff = "-" if result.get("difference") is None else \
                f"{result['difference']:+.4g} [{result['low']:+.4g}, {result['high']:+.4g}]"
            table.append([arm, metric, format_value(summary.get(metric)), format_value(arms[control].get(metric)), diff,
                          format_value(result.get("pvalue")), format_value(result.get("pvalue_holm")),
                          format_value(result.get("always_valid_pvalue")), format_value(result.get("significant"))])
    page.table(["arm", "metric", "arm mean", "control mean", "difference [95% CI]", "p", "p (Holm)",
                "always-valid p", "significant"], table)
    treated = order[1:]
    if treated:
        figure = make_subplots(rows=1, cols=len(METRICS), subplot_titles=list(METRICS.values()))
        for col, metric in enumerate(METRICS, start=1):
            for arm in treated:
                r = report["comparisons"].get(arm, {}).get(metric, {})
                if r.get("difference") is None:
                    continue
                figure.add_trace(go.Scatter(
                    x=[arm], y=[r["difference"]], mode="markers", name=arm, marker={"color": colors[arm], "size": 10},
                    showlegend=col == 1,
                    error_y={"type": "data", "symmetric": False, "array": [r["high"] - r["difference"]],
                             "arrayminus": [r["difference"] - r["low"]]},
                    hovertext=[f"p {format_value(r.get('pvalue'))}; Holm p {format_value(r.get('pvalue_holm'))}; "
                               f"always-valid p {format_value(r.get('always_valid_pvalue'))}"]), row=1, col=col)
            figure.add_hline(y=0, line_dash="dash", line_color="#888", row=1, col=col)
        figure.update_layout(title=f"Difference vs control '{control}' (95% bootstrap CI)")
        figure.update_annotations(font_size=11)
        page.figure(figure)
        figure = go.Figure([go.Bar(x=list(METRICS), name=arm, marker_color=colors[arm],
                                   y=[report["comparisons"].get(arm, {}).get(m, {}).get("always_valid_pvalue")
                                      for m in METRICS]) for arm in treated])
        figure.add_hline(y=report["alpha"], line_dash="dash", line_color="#a00",
                         annotation_text=f"alpha {report['alpha']}")
        figure.update_layout(title="Always-valid p-value (mSPRT) per metric", barmode="group", yaxis_range=[0, 1],
                             yaxis_title="always-valid p")
        page.figure(figure, height=360)
    if rows:
        figure = make_subplots(rows=1, cols=len(METRICS), subplot_titles=list(METRICS.values()))
        for col, metric in enumerate(METRICS, start=1):
            for arm in order:
                values = [float(r[metric]) for r in rows if r.get("arm") == arm and r.get(metric) is not None]
                if values:
                    figure.add_trace(go.Box(y=values, name=arm, marker_color=colors[arm], showlegend=col == 1),
                                     row=1, col=col)
        figure.update_layout(title="Per-request distributions by arm")
        figure.update_annotations(font_size=11)
        page.figure(figure)
    return page.render()


def _assignment(summary: dict[str, Any]) -> str:
    return ", ".join(f"{n} {how}" for how, n in summary.get("assignment", {}).items() if n) or "-"


def write_html(path: Path | str, document: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
