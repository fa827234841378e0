"""The HTML reports open in a real headless browser (Debian's Chromium) without JavaScript errors,
and every figure is drawn."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

from sinkguard.evaluation.ab_report import ab_report
from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.html_report import ab_report_html, eval_report_html, write_html
from sinkguard.evaluation.runner import EvalRun
from sinkguard.evaluation.sink_stats import aggregate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(path: Path, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran (virtual time: plotly's promises settle)."""
    if CHROMIUM is None:  # a missing browser is a set-up failure, not a reason to pass
        pytest.fail("chromium is not installed: run scripts/setup.sh (apt-get install -y chromium)")
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                             "--virtual-time-budget=10000", "--dump-dom", path.resolve().as_uri()],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def check_drawn(dom: str, figures: int) -> None:
    errors = re.search(r'<pre id="sinkguard-errors"([^>]*)>(.*?)</pre>', dom, re.S)
    assert errors is not None, "the page did not load"
    assert errors.group(2) == "" and "hidden" in errors.group(1), f"JavaScript errors: {errors.group(2)}"
    assert dom.count('class="plotly-graph-div') == figures
    assert dom.count('class="plot-container plotly"') == figures, "not every figure was drawn"
    assert dom.count('class="main-svg"') >= 2 * figures  # plotly draws each figure in two stacked svgs


def real_shaped_run() -> EvalRun:
    """A run shaped like `sinkguard eval` output: perplexity, MMLU and retrieval, two arms, sink statistics."""
    rng = np.random.default_rng(0)
    arms = ["none", "act"]
    ppl_items = [{"id": f"ppl-{i}", "source": "license"} for i in range(8)]
    mc_items = [{"id": f"mc-{i}", "question": "q", "choices": ["a", "b", "c", "d"], "answer": i % 4, "topic": "t"}
                for i in range(20)]
    ret_items = [{"id": f"passkey-{n}-{i}", "kind": "passkey", "length": n, "depth": 0.5, "answer": "12345"}
                 for n in (512, 1024) for i in range(6)]
    tasks = {"perplexity": {"kind": "perplexity", "items": ppl_items, "results": {}},
             "mmlu": {"kind": "multiple_choice", "items": mc_items, "results": {}},
             "retrieval": {"kind": "retrieval", "items": ret_items, "results": {}}}
    stats = {}
    for shift, arm in enumerate(arms):
        tasks["perplexity"]["results"][arm] = [{"logprob_sum": float(-300 + rng.normal(0, 5) + 3 * shift),
                                                "tokens": 256, "response_id": f"cmpl-p{i}{arm}"} for i in range(8)]
        tasks["mmlu"]["results"][arm] = [{"choice_logprobs": [-1.0] * 4, "predicted": 0,
                                          "correct": bool(rng.random() < .4),
                                          "response_ids": [f"cmpl-m{i}{j}{arm}" for j in range(4)]} for i in range(20)]
        tasks["retrieval"]["results"][arm] = [
            {"text": " 12345", "correct": bool(rng.random() < (0.9 if item["length"] == 512 else 0.6)),
             "token_logprobs": [-0.1], "top_logprobs": [{" 123": -0.1}], "ttft_s": float(rng.gamma(4, 0.05)),
             "tpot_s": float(rng.gamma(4, 0.005)), "output_tokens": 10, "response_id": f"cmpl-r{i}{arm}"}
            for i, item in enumerate(ret_items)]
        records = [{"tokens_scanned": {"prefill": 256, "decode": 0}, "events_dropped": 0,
                    "events": [{"kind": "secondary", "is_reference": False, "birth_layer": int(b), "lifetime": 4}
                               for b in rng.integers(3 + 2 * shift, 20, size=3 - shift)],
                    "sink_counts": {"reference": 1, "primary": 0, "secondary": 3 - shift, "noise": 1},
                    "interventions_applied": {"mlp_scale": 12, "attention_redistribution": 4} if shift else {}}
                   for _ in range(30)]
        stats[arm] = {"all": aggregate(records), "tasks": {}}
    sink_stats = {"available": True, "source": "GET /sinkguard/requests/{response_id}", "label": "flags", "arms": stats}
    config = {"server": "http://127.0.0.1:8000", "served_model": "smol", "arms": arms, "tasks": list(tasks), "seed": 0}
    return EvalRun(config, "none", arms, tasks, {"none": 12.5, "act": 13.1}, sink_stats)


def ab_log(n: int = 200) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"request_id": f"r{i}", "arm": "act" if i % 2 else "none", "assignment": "sticky",
             "latency_s": float(rng.normal(1.0 + 0.1 * (i % 2), 0.2)), "mean_logprob": float(rng.normal(-1.5, 0.3)),
             "secondary_sinks": int(rng.poisson(3)), "interventions": int(rng.poisson(50)) if i % 2 else 0}
            for i in range(n)]


def test_the_evaluation_report_draws_every_figure_without_errors(tmp_path):
    run = real_shaped_run()
    path = write_html(tmp_path / "report.html", eval_report_html(run, compare(run)))
    page = path.read_text().replace(get_plotlyjs(), "")  # self-contained: plotly.js inline, nothing fetched
    assert get_plotlyjs() in path.read_text() and "src=" not in page and "<link" not in page
    # NLL diff, 2 accuracy, sinks by layer, interventions by kind, latency, retrieval by length
    check_drawn(rendered(path, tmp_path), figures=7)


def test_the_ab_report_draws_every_figure_without_errors(tmp_path):
    log, path = tmp_path / "ab.jsonl", tmp_path / "ab.html"
    log.write_text("".join(json.dumps(row) + "\n" for row in ab_log()))
    proc = subprocess.run([sys.executable, "-m", "sinkguard", "ab", "report", str(log), "--html", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "always-valid p" in path.read_text() and "ab.jsonl" in path.read_text()
    check_drawn(rendered(path, tmp_path), figures=3)  # differences, always-valid p, distributions
    empty = write_html(tmp_path / "empty.html", ab_report_html(ab_report([])))
    check_drawn(rendered(empty, tmp_path), figures=0)


def test_a_broken_report_is_detected(tmp_path):
    """The check above can fail: a page whose plots cannot be drawn reports the error in the page."""
    run = real_shaped_run()
    document = eval_report_html(run, compare(run)).replace("Plotly.newPlot(", "Plotly.noSuchFunction(", 1)
    path = write_html(tmp_path / "broken.html", document)
    with pytest.raises(AssertionError, match="JavaScript errors: .*noSuchFunction"):
        check_drawn(rendered(path, tmp_path), figures=7)
