"""What an evaluation leaves on disk, the same for ``sinkguard eval``, ``sinkguard lm-eval`` and the
demo: run.json (everything measured), comparison.json / comparison.md (the paired statistics,
computed from the saved run alone) and a self-contained report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.runner import EvalRun


def save_evaluation(run: EvalRun, out: Path, seed: int = 0) -> tuple[dict[str, Any], dict[str, Path]]:
    """Save ``run`` and its comparison in ``out``; returns the comparison and the files by kind."""
    from sinkguard.evaluation.html_report import eval_report_html, write_html
    from sinkguard.evaluation.summary import comparison_markdown

    out.mkdir(parents=True, exist_ok=True)
    paths = {"run": run.save(out / "run.json")}
    comparison = compare(EvalRun.load(paths["run"]), seed=seed)  # from the saved run: reproducible by construction
    paths["comparison"] = out / "comparison.json"
    paths["comparison"].write_text(json.dumps(comparison, indent=1))
    paths["markdown"] = out / "comparison.md"
    paths["markdown"].write_text(comparison_markdown(comparison))
    paths["report"] = write_html(out / "report.html", eval_report_html(run, comparison))
    return comparison, paths
