"""The statistics against reference values: textbook examples, scipy and statsmodels."""

from __future__ import annotations

import numpy as np
import pytest

from sinkguard.evaluation.stats import holm, mcnemar_exact, msprt, paired_bootstrap


def test_mcnemar_exact_matches_statsmodels_and_a_textbook_table():
    from statsmodels.stats.contingency_tables import mcnemar

    rng = np.random.default_rng(1)
    for _ in range(5):
        control = rng.random(60) < 0.6
        treatment = np.where(rng.random(60) < 0.2, ~control, control)
        got = mcnemar_exact(treatment, control)
        table = [[np.sum(treatment & control), np.sum(treatment & ~control)],
                 [np.sum(~treatment & control), np.sum(~treatment & ~control)]]
        assert got.pvalue == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)
    # discordant pairs 1 vs 9 (b + c = 10): two-sided exact p = 2 * P(X <= 1 | n=10, 1/2) = 22/1024
    treatment = [True] * 1 + [False] * 9 + [True] * 5
    control = [False] * 1 + [True] * 9 + [True] * 5
    result = mcnemar_exact(treatment, control)
    assert (result.only_treatment, result.only_control) == (1, 9)
    assert result.pvalue == pytest.approx(22 / 1024)
    assert mcnemar_exact([True, False], [True, False]).pvalue == 1.0


def test_holm_matches_the_textbook_step_down():
    rejected, adjusted = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, max(0.04*1, 0.06)=0.06
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rejected == [True, False, False, True]
    assert holm([]) == ([], [])


def test_paired_bootstrap_covers_the_mean_difference_like_the_normal_interval():
    rng = np.random.default_rng(0)
    control = rng.normal(0, 1, 400)
    treatment = control + rng.normal(0.3, 0.5, 400)  # paired: the shared part cancels
    interval = paired_bootstrap(treatment, control, seed=3)
    diff = treatment - control
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)
    assert interval.estimate == pytest.approx(diff.mean())
    assert interval.low == pytest.approx(diff.mean() - half, abs=0.01)
    assert interval.high == pytest.approx(diff.mean() + half, abs=0.01)
    assert paired_bootstrap(treatment, control, seed=3) == interval  # seeded: reproducible
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_msprt_is_always_valid_under_the_null_and_finds_real_effects():
    rng = np.random.default_rng(7)
    # continuous monitoring: a false positive is any look with p <= alpha; mSPRT bounds it by alpha
    looks = [msprt(rng.normal(0, 1, 300), variance=1.0, tau2=0.1).rejected for _ in range(400)]
    assert np.mean(looks) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 400)
    effect = msprt(rng.normal(0.4, 1, 300), variance=1.0, tau2=0.1)
    assert effect.rejected and effect.pvalue < 1e-3 and effect.difference == pytest.approx(0.4, abs=0.15)
    # a closed-form value: one look, n=1, x=2, V=1, tau2=1: Lambda = sqrt(1/2) exp(4 / 4)
    assert msprt([2.0], variance=1.0, tau2=1.0).pvalue == pytest.approx(1 / (np.sqrt(0.5) * np.e))
    assert msprt([]).pvalue == 1.0
