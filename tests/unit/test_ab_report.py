"""The live A/B report on synthetic logs with a known truth."""

from __future__ import annotations

import numpy as np

from sinkguard.evaluation.ab_report import ab_report


def log(seed: int, effect: float, n: int = 400) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        arm = "act" if i % 2 else "none"
        rows.append({"request_id": f"r{i}", "arm": arm, "assignment": "sticky",
                     "latency_s": float(rng.normal(1.0 + (effect if arm == "act" else 0.0), 0.2)),
                     "mean_logprob": float(rng.normal(-1.5, 0.3)), "secondary_sinks": int(rng.poisson(3)),
                     "interventions": int(rng.poisson(50)) if arm == "act" else 0})
    return rows


def test_a_real_latency_effect_is_found_and_a_null_one_is_not():
    report = ab_report(log(0, effect=0.1), control="none")
    latency = report["comparisons"]["act"]["latency_s"]
    assert report["arms"]["act"]["requests"] == report["arms"]["none"]["requests"] == 200
    assert latency["low"] < 0.1 < latency["high"] and latency["significant"]
    assert latency["always_valid_pvalue"] < 0.05
    assert not report["comparisons"]["act"]["mean_logprob"]["significant"]
    assert report["comparisons"]["act"]["interventions"]["difference"] > 40
    null = ab_report(log(1, effect=0.0), control="none")["comparisons"]["act"]["latency_s"]
    assert not null["significant"] and null["always_valid_pvalue"] > 0.05
    assert ab_report([])["requests"] == 0


def test_failed_requests_are_counted_not_averaged():
    rows = log(3, 0.0, n=40)
    rows += [{"request_id": f"e{i}", "arm": "act", "assignment": "sticky", "status": 400, "latency_s": 100.0,
              "mean_logprob": None} for i in range(5)]
    report = ab_report(rows)
    assert report["arms"]["act"]["requests"] == 25 and report["arms"]["act"]["errors"] == 5
    assert report["arms"]["act"]["latency_s"] < 2.0  # the failures' latency is not in the mean
    assert report["arms"]["none"]["errors"] == 0
