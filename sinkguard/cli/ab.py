"""``sinkguard ab``: reports of a live A/B experiment from the server's log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sinkguard.cli.options import console
from sinkguard.errors import SinkguardError


def ab_report_command(
    log: Annotated[Path, typer.Argument(help="The server's A/B log (JSON lines, one record per request).")],
    control: Annotated[Optional[str], typer.Option("--control", help="Control arm (default: none, if present).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report (plots) here.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the resampling tests.")] = 0,
) -> None:
    """Per-arm metrics of a running or finished experiment, with significance that stays valid
    however often you look (mSPRT) next to the fixed-horizon tests (bootstrap, permutation, Holm)."""
    import json

    from sinkguard.evaluation.ab_report import ab_report
    from sinkguard.evaluation.summary import print_ab_report
    from sinkguard.serving.ab import read_log

    if not log.is_file():
        raise SinkguardError(f"A/B log not found: {log}")
    try:
        rows = read_log(log)
    except ValueError as exc:
        raise SinkguardError(str(exc)) from None
    report = ab_report(rows, control, seed=seed)
    print_ab_report(report, console)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1))
        console.print(f"wrote {json_out}")
    if html_out is not None:
        from sinkguard.evaluation.html_report import ab_report_html, write_html

        console.print(f"wrote {write_html(html_out, ab_report_html(report, rows, source=str(log)))}")
