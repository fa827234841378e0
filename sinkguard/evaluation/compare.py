"""Paired comparison of every arm with the control arm, computed from a saved run alone.

Per task and arm: the aggregate (perplexity, accuracy, accuracy by context length), the paired
effect with its uncertainty -- continuous metrics (per-item negative log-likelihood per token):
mean difference with a paired BCa bootstrap interval and a paired permutation p-value; accuracy:
Wilson intervals per arm (and per context length), the paired difference with a bootstrap interval
and an exact McNemar p-value -- and Holm's correction across all arms and metrics.
Generations are also compared with the control arm's token by token: the first position where the
greedy outputs differ, top-1 agreement and KL(control || arm) over the returned top-k
log-probabilities at the positions where both saw the same context. Latency per arm: time to
first token and time per output token of the streamed generations. Sink statistics per arm, when
the run has them, with every arm's by-layer counts over the same layers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sinkguard.evaluation import sink_stats
from sinkguard.evaluation.runner import EvalRun
from sinkguard.evaluation.stats import holm, mcnemar_exact, paired_bootstrap
from sinkguard.evaluation.tasks import accuracy, perplexity


def paired_permutation_pvalue(treatment: np.ndarray, control: np.ndarray, seed: int = 0,
                              resamples: int = 9999) -> float:
    """Two-sided p-value of a zero mean paired difference (sign-flip permutation test, scipy)."""
    from scipy.stats import permutation_test

    diff = treatment - control
    if diff.size < 2 or np.all(diff == 0):
        return 1.0
    result = permutation_test((treatment, control), lambda x, y, axis=-1: np.mean(x - y, axis=axis),
                              permutation_type="samples", vectorized=True, n_resamples=resamples,
                              alternative="two-sided", rng=np.random.default_rng(seed))
    return float(result.pvalue)


def agreement(control: dict[str, Any], arm: dict[str, Any]) -> dict[str, Any]:
    """Token-level agreement of one item's greedy generations (control vs arm)."""
    a, b = control.get("top_logprobs") or [], arm.get("top_logprobs") or []
    diverged = None
    top1, kls = [], []
    for position, (p, q) in enumerate(zip(a, b)):
        if not p or not q:
            break
        best_p, best_q = max(p, key=p.get), max(q, key=q.get)
        top1.append(best_p == best_q)
        kls.append(_kl(p, q))
        if best_p != best_q:  # later positions see different contexts
            diverged = position
            break
    if diverged is None and len(a) != len(b):
        diverged = min(len(a), len(b))
    return {"first_divergence": diverged, "top1": top1, "kl": kls}


def _kl(p: dict[str, float], q: dict[str, float]) -> float:
    """KL(p || q) over the union of two top-k lists, each renormalised; a token missing from q's list
    gets q's smallest listed probability (its true value is at most that)."""
    keys = sorted(set(p) | set(q))
    floor_p, floor_q = min(p.values()), min(q.values())
    lp = np.array([p.get(k, floor_p) for k in keys])
    lq = np.array([q.get(k, floor_q) for k in keys])
    pp, qq = np.exp(lp - np.logaddexp.reduce(lp)), np.exp(lq - np.logaddexp.reduce(lq))
    return float(np.sum(pp * (np.log(pp) - np.log(qq))))


def compare(run: EvalRun, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Per task, per arm: aggregates, paired effects vs the control, Holm-adjusted decisions."""
    out: dict[str, Any] = {"control": run.control, "arms": run.arms, "tasks": {}, "latency": {}}
    tests: list[tuple[str, str, str]] = []  # (task, arm, metric) of each p-value, for Holm
    pvalues: list[float] = []
    for name, task in run.tasks.items():
        kind, results = task["kind"], task["results"]
        base = results[run.control]
        entry: dict[str, Any] = {"kind": kind, "items": len(task["items"]), "arms": {}}
        for arm in run.arms:
            rows = results[arm]
            summary: dict[str, Any] = {}
            if kind == "perplexity":
                summary["perplexity"] = perplexity(rows)
                if arm != run.control:
                    treat = np.array([-r["logprob_sum"] / r["tokens"] for r in rows])
                    ctrl = np.array([-r["logprob_sum"] / r["tokens"] for r in base])
                    summary["nll_per_token_diff"] = paired_bootstrap(treat, ctrl, seed=seed).to_dict()
                    summary["pvalue"] = paired_permutation_pvalue(treat, ctrl, seed=seed)
                    tests.append((name, arm, "nll_per_token"))
                    pvalues.append(summary["pvalue"])
            else:
                summary["accuracy"] = accuracy(rows)
                summary["accuracy_interval"] = wilson(sum(bool(r["correct"]) for r in rows), len(rows))
                if kind == "retrieval":
                    summary["accuracy_by_length"] = _by_length(task["items"], rows)
                    summary["accuracy_by_length_interval"] = _by_length_interval(task["items"], rows)
                if arm != run.control:
                    test = mcnemar_exact([r["correct"] for r in rows], [r["correct"] for r in base])
                    summary["accuracy_diff"] = summary["accuracy"] - accuracy(base)
                    summary["accuracy_diff_interval"] = paired_bootstrap(
                        [float(r["correct"]) for r in rows], [float(r["correct"]) for r in base], seed=seed).to_dict()
                    summary["discordant"] = {"only_arm": test.only_treatment, "only_control": test.only_control}
                    summary["pvalue"] = test.pvalue
                    tests.append((name, arm, "accuracy"))
                    pvalues.append(test.pvalue)
                    if kind in ("retrieval", "generation"):
                        summary["agreement"] = _agreement_summary(base, rows)
            entry["arms"][arm] = summary
        out["tasks"][name] = entry
    rejected, adjusted = holm(pvalues, alpha)
    for (name, arm, metric), reject, p in zip(tests, rejected, adjusted):
        summary = out["tasks"][name]["arms"][arm]
        summary["pvalue_holm"] = p
        summary["significant"] = reject
        summary["metric"] = metric
    for arm in run.arms:
        out["latency"][arm] = _latency([r for t in run.tasks.values() if t["kind"] in ("retrieval", "generation")
                                        for r in t["results"][arm]])
    out["alpha"] = alpha
    out["tests"] = len(pvalues)
    out["sink_stats"] = _sink_stats(run)
    out["warnings"] = unapplied_warnings(out["sink_stats"])
    return out


def unapplied_warnings(stats: dict[str, Any] | None) -> list[str]:
    """One line per arm some of whose requests ran without the arm's policy (from their records)."""
    warnings = []
    for arm, found in ((stats or {}).get("arms") or {}).items():
        if found.get("not_applied"):
            reasons = "; ".join(f"{n}x {why}" for why, n in found.get("not_applied_reasons", {}).items())
            warnings.append(f"arm {arm}: {found['not_applied']} of {found['records']} requests ran without the arm's "
                            f"policy ({reasons}): its results mix in unedited outputs")
    return warnings


def wilson(successes: int, trials: int, confidence: float = 0.95) -> dict[str, float] | None:
    """Wilson score interval of a proportion (sound at 0/n and n/n, unlike the normal one)."""
    from statsmodels.stats.proportion import proportion_confint

    if trials == 0:
        return None
    low, high = proportion_confint(successes, trials, alpha=1 - confidence, method="wilson")
    return {"low": float(low), "high": float(high), "successes": successes, "trials": trials}


def _by_length_interval(items: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {length: wilson(sum(v), len(v)) for length, v in _correct_by_length(items, rows).items()}


def _sink_stats(run: EvalRun) -> dict[str, Any] | None:
    """The run's sink statistics per arm (overall and per task), by-layer lists aligned across arms."""
    found = run.sink_stats
    if not found or not found.get("available"):
        return found
    arms = {arm: found["arms"][arm] for arm in run.arms if arm in found["arms"]}
    overall = sink_stats.padded({arm: entry["all"] for arm, entry in arms.items() if "all" in entry})
    tasks = {name: sink_stats.padded({arm: entry["tasks"][name] for arm, entry in arms.items()
                                      if name in entry.get("tasks", {})})
             for name in run.tasks}
    return {key: found[key] for key in ("available", "source", "label")} | {"arms": overall, "tasks": tasks}


def _by_length(items: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, float]:
    return {length: sum(v) / len(v) for length, v in _correct_by_length(items, rows).items()}


def _correct_by_length(items: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, list[bool]]:
    """Per context length (ascending, as a JSON key): whether each item was answered correctly."""
    groups: dict[int, list[bool]] = {}
    for item, row in zip(items, rows):
        groups.setdefault(int(item["length"]), []).append(bool(row["correct"]))
    return {str(length): found for length, found in sorted(groups.items())}


def _agreement_summary(control: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    found = [agreement(c, r) for c, r in zip(control, rows)]
    top1 = [x for f in found for x in f["top1"]]
    kls = [x for f in found for x in f["kl"]]
    divergences = [f["first_divergence"] for f in found]
    return {"identical_generations": sum(d is None for d in divergences) / len(found) if found else math.nan,
            "median_first_divergence": float(np.median([d for d in divergences if d is not None]))
            if any(d is not None for d in divergences) else None,
            "top1_agreement": float(np.mean(top1)) if top1 else None,
            "kl_mean": float(np.mean(kls)) if kls else None}


def _latency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in rows if r.get("ttft_s") is not None]
    tpot = [r["tpot_s"] for r in rows if r.get("tpot_s") is not None]
    return {"requests": len(rows),
            "ttft_ms": {"mean": 1000 * float(np.mean(ttft)), "p50": 1000 * float(np.median(ttft))} if ttft else None,
            "tpot_ms": {"mean": 1000 * float(np.mean(tpot)), "p50": 1000 * float(np.median(tpot))} if tpot else None,
            "ttft_s": ttft, "tpot_s": tpot}
