"""``sinkguard ab report LOG``: per-arm metrics of a live A/B log, with significance an operator may
look at while the experiment runs.

Arms of a live experiment see *different* requests, so comparisons are two-sample: the difference
of means with a bootstrap interval (:func:`scipy.stats.bootstrap`, independent samples), a
permutation p-value, Holm across arms and metrics, and an always-valid mSPRT p-value
(:func:`sinkguard.evaluation.stats.msprt`) on the stream of differences between the i-th request of the arm
and the i-th request of the control in arrival order (the two-sample construction of Johari et
al.), so repeated looks do not inflate false positives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sinkguard.evaluation.stats import holm, msprt

METRICS = {
    "latency_s": "end-to-end latency (s)",
    "ttft_s": "time to first token (s, streamed requests)",
    "mean_logprob": "mean log-probability of generated tokens",
    "secondary_sinks": "secondary sinks per request",
    "interventions": "intervention edits per request",
}


def _values(rows: Sequence[dict[str, Any]], metric: str) -> np.ndarray:
    return np.array([float(r[metric]) for r in rows if r.get(metric) is not None], dtype=float)


def two_sample(arm: np.ndarray, control: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Difference of means (arm - control): bootstrap 95% interval, permutation p-value, mSPRT p-value."""
    from scipy.stats import bootstrap, permutation_test

    if arm.size < 2 or control.size < 2:
        return {"difference": None, "low": None, "high": None, "pvalue": None, "always_valid_pvalue": None}
    statistic = lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis)  # noqa: E731
    rng = np.random.default_rng(seed)
    if np.all(arm == arm[0]) and np.all(control == control[0]):
        low = high = float(arm[0] - control[0])
        pvalue = 1.0 if low == 0 else 0.0
    else:
        interval = bootstrap((arm, control), statistic, vectorized=True, n_resamples=9999, rng=rng,
                             method="percentile").confidence_interval
        low, high = float(interval.low), float(interval.high)
        pvalue = float(permutation_test((arm, control), statistic, vectorized=True, n_resamples=9999,
                                        permutation_type="independent", rng=rng).pvalue)
    paired = min(arm.size, control.size)
    sequential = msprt(arm[:paired] - control[:paired])
    return {"difference": float(arm.mean() - control.mean()), "low": low, "high": high, "pvalue": pvalue,
            "always_valid_pvalue": sequential.pvalue}


def ab_report(rows: Sequence[dict[str, Any]], control: str | None = None, alpha: float = 0.05,
              seed: int = 0) -> dict[str, Any]:
    """Per-arm summaries and every arm vs the control on each logged metric."""
    arms = sorted({r["arm"] for r in rows})
    if not arms:
        return {"arms": {}, "comparisons": {}, "requests": 0}
    control = control if control in arms else ("none" if "none" in arms else arms[0])
    every = {arm: [r for r in rows if r["arm"] == arm] for arm in arms}
    # metrics compare answered requests that ran their arm's policy; failed ones (an HTTP error), ones
    # the client abandoned, and ones served without their arm's interventions (detector off: the arm
    # would silently become the control) are counted per arm instead
    by_arm = {arm: [r for r in found if r.get("status", 200) == 200 and not r.get("abandoned")
                    and r.get("applied") is not False] for arm, found in every.items()}
    summary = {arm: {"requests": len(every[arm]),
                     "errors": sum(r.get("status", 200) != 200 for r in every[arm]),
                     "abandoned": sum(bool(r.get("abandoned")) for r in every[arm]),
                     "not_applied": sum(r.get("applied") is False for r in every[arm]),
                     "compared": len(found),
                     "assignment": {how: sum(r.get("assignment") == how for r in every[arm])
                                    for how in ("sticky", "random", "explicit")},
                     **{metric: (float(_values(found, metric).mean()) if _values(found, metric).size else None)
                        for metric in METRICS}}
               for arm, found in by_arm.items()}
    comparisons: dict[str, dict[str, Any]] = {}
    keys, pvalues = [], []
    for arm in arms:
        if arm == control:
            continue
        comparisons[arm] = {}
        for metric in METRICS:
            result = two_sample(_values(by_arm[arm], metric), _values(by_arm[control], metric), seed)
            comparisons[arm][metric] = result
            if result["pvalue"] is not None:
                keys.append((arm, metric))
                pvalues.append(result["pvalue"])
    rejected, adjusted = holm(pvalues, alpha)
    for (arm, metric), reject, p in zip(keys, rejected, adjusted):
        comparisons[arm][metric].update(pvalue_holm=p, significant=reject)
    return {"control": control, "alpha": alpha, "requests": len(rows), "arms": summary, "comparisons": comparisons}
