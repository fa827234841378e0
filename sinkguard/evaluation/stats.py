"""Statistics for comparing arms: paired where items are shared, always-valid where traffic is live.

- :func:`paired_bootstrap` -- confidence interval of a paired difference of a continuous metric
  (per-item log-likelihood, KL, latency) via :func:`scipy.stats.bootstrap` (``paired=True``, BCa);
- :func:`mcnemar_exact` -- exact McNemar test for paired accuracy (the binomial test on the
  discordant pairs, as ``statsmodels``' ``mcnemar(exact=True)``);
- :func:`holm` -- Holm's step-down correction across arms and metrics
  (``statsmodels.stats.multitest.multipletests``);
- :func:`msprt` -- the mixture sequential probability ratio test (Johari et al. 2017, normal
  mixture over the effect with variance ``tau2``): an always-valid p-value for a difference of
  means, so an operator may look at a running experiment as often as they like without inflating
  the false-positive rate.

Every function takes plain arrays and a seed where randomness is involved, so every number is
reproducible from a saved run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "confidence": self.confidence}


def paired_bootstrap(treatment: Sequence[float], control: Sequence[float], confidence: float = 0.95,
                     resamples: int = 9999, seed: int = 0) -> Interval:
    """Mean of ``treatment - control`` over paired items with a BCa bootstrap interval."""
    from scipy.stats import bootstrap

    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.shape != c.shape or t.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {t.shape} and {c.shape}")
    estimate = float(np.mean(t - c))
    if t.size < 2 or np.all(t - c == (t - c)[0]):  # no spread: the interval is the point
        return Interval(estimate, estimate, estimate, confidence)
    result = bootstrap((t, c), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                       confidence_level=confidence, n_resamples=resamples, method="BCa",
                       rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(estimate, float(low), float(high), confidence)


@dataclass(frozen=True)
class McNemar:
    only_treatment: int  # items right under the treatment arm only
    only_control: int
    pvalue: float


def mcnemar_exact(treatment_correct: Sequence[bool], control_correct: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test: under H0 the discordant pairs split 50/50."""
    from scipy.stats import binomtest

    t, c = np.asarray(treatment_correct, dtype=bool), np.asarray(control_correct, dtype=bool)
    if t.shape != c.shape:
        raise ValueError(f"paired outcomes need equal shapes, got {t.shape} and {c.shape}")
    b, c_only = int(np.sum(t & ~c)), int(np.sum(~t & c))
    pvalue = 1.0 if b + c_only == 0 else float(binomtest(min(b, c_only), b + c_only, 0.5).pvalue)
    return McNemar(b, c_only, pvalue)


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[list[bool], list[float]]:
    """Holm's correction: (rejected, adjusted p-values), in the input order."""
    if len(pvalues) == 0:
        return [], []
    from statsmodels.stats.multitest import multipletests

    rejected, adjusted, _, _ = multipletests(np.asarray(pvalues, dtype=float), alpha=alpha, method="holm")
    return [bool(r) for r in rejected], [float(p) for p in adjusted]


@dataclass(frozen=True)
class SequentialTest:
    n: int
    difference: float  # current estimate of the mean difference
    pvalue: float  # always-valid: min over every look so far
    rejected: bool
    alpha: float


def msprt(differences: Sequence[float], variance: float | None = None, tau2: float | None = None,
          alpha: float = 0.05, theta0: float = 0.0) -> SequentialTest:
    """Always-valid test of ``mean(differences) == theta0`` after each observation.

    ``differences``: per-observation effects in arrival order (paired differences, or a two-arm
    difference stream). ``variance``: their variance (default: the sample variance, a plug-in as
    in practice); ``tau2``: the mixing variance over effects (default: ``variance``, i.e. effects of
    about one standard deviation are the ones the test is tuned for). The p-value is
    ``min(1, min_k 1 / Lambda_k)`` with the normal-mixture likelihood ratio

        Lambda_n = sqrt(V / (V + n tau2)) * exp(n^2 tau2 (mean_n - theta0)^2 / (2 V (V + n tau2)))

    so P(p_n <= alpha for some n) <= alpha under H0, however often one looks.
    """
    x = np.asarray(differences, dtype=float)
    n = x.size
    if n == 0:
        return SequentialTest(0, 0.0, 1.0, False, alpha)
    v = float(np.var(x, ddof=1)) if variance is None and n > 1 else (variance or 0.0)
    if v <= 0:
        v = 1e-12
    t2 = v if tau2 is None else tau2
    counts = np.arange(1, n + 1, dtype=float)
    means = np.cumsum(x) / counts
    log_lambda = (0.5 * np.log(v / (v + counts * t2))
                  + counts**2 * t2 * (means - theta0) ** 2 / (2 * v * (v + counts * t2)))
    pvalue = float(min(1.0, math.exp(-float(np.max(log_lambda)))))
    return SequentialTest(n, float(means[-1]), pvalue, pvalue <= alpha, alpha)
