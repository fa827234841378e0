"""The paired comparison and its summaries, from a synthetic saved run with a known truth."""

from __future__ import annotations

import numpy as np

from sinkguard.evaluation.compare import agreement, compare
from sinkguard.evaluation.runner import EvalRun
from sinkguard.evaluation.summary import comparison_markdown


def synthetic_run() -> EvalRun:
    rng = np.random.default_rng(0)
    items = [{"id": f"p{i}"} for i in range(40)]
    none = [{"logprob_sum": float(-100 + rng.normal(0, 5)), "tokens": 50} for _ in items]
    better = [{"logprob_sum": r["logprob_sum"] + 5.0 + float(rng.normal(0, 0.5)), "tokens": 50} for r in none]
    truth = rng.random(60) < 0.5
    mc_none = [{"correct": bool(t), "predicted": 0} for t in truth]
    mc_act = [{"correct": bool(t), "predicted": 0} for t in truth]
    mc_act[0]["correct"] = not mc_act[0]["correct"]  # one discordant pair: no evidence
    tasks = {"perplexity": {"kind": "perplexity", "items": items, "results": {"none": none, "act": better}},
             "mmlu": {"kind": "multiple_choice", "items": [{"id": f"m{i}"} for i in range(60)],
                      "results": {"none": mc_none, "act": mc_act}}}
    return EvalRun({}, "none", ["none", "act"], tasks)


def test_a_real_improvement_is_significant_and_a_single_flip_is_not():
    result = compare(synthetic_run())
    ppl = result["tasks"]["perplexity"]["arms"]["act"]
    assert ppl["perplexity"] < result["tasks"]["perplexity"]["arms"]["none"]["perplexity"]
    assert ppl["nll_per_token_diff"]["high"] < 0 and ppl["significant"]  # 0.1 nats/token better
    mmlu = result["tasks"]["mmlu"]["arms"]["act"]
    assert mmlu["pvalue"] == 1.0 and not mmlu["significant"] and result["tests"] == 2
    text = comparison_markdown(result)
    assert "| perplexity | act | perplexity |" in text and "| mmlu | act | accuracy |" in text


def test_agreement_stops_at_the_first_divergence():
    same = {"top_logprobs": [{"a": -0.1, "b": -2.0}, {"c": -0.2, "d": -1.0}]}
    other = {"top_logprobs": [{"a": -0.1, "b": -2.0}, {"d": -0.1, "c": -3.0}]}
    found = agreement(same, other)
    assert found["first_divergence"] == 1 and found["top1"] == [True, False] and found["kl"][0] == 0.0
    assert agreement(same, same)["first_divergence"] is None
