"""`sinkguard eval` against the real server: two arms, numbers equal to an in-process computation."""

from __future__ import annotations

import math

import pytest

from sinkguard.evaluation import build_tasks
from sinkguard.evaluation.client import ArmClient
from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.runner import EvalRun, evaluate
from sinkguard.evaluation.tasks import multiple_choice_prompt
from sinkguard.policy import load_policies
from sinkguard.selection import token_logprobs


@pytest.fixture(scope="module")
def two_arms(server, hf_model, tmp_path_factory):
    tokenizer = hf_model.tokenizer
    tasks = build_tasks(["perplexity", "mmlu", "retrieval"], tokenizer, seed=1, perplexity_prompts=2,
                        perplexity_tokens=96, mmlu_items=4, retrieval_lengths=[256], retrieval_per_length=1)
    api_key = server.user_headers["Authorization"].split(" ", 1)[1]
    clients = {arm: ArmClient(server.base_url, "smol", arm, api_key) for arm in ("none", "act")}
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    run = evaluate(clients, tasks, encode, "none", concurrency=4, progress=False)
    path = run.save(tmp_path_factory.mktemp("eval") / "run.json")
    return tasks, run, path, encode


def test_server_numbers_equal_an_in_process_computation(two_arms, hf_model, served_profile, policy_file):
    tasks, run, _, encode = two_arms
    policies = load_policies(policy_file)
    by_name = {t.name: t for t in tasks}
    for arm in ("none", "act"):
        policy = policies.get(arm)
        # perplexity: every prompt token's log-probability under the arm, summed
        for item, measured in zip(by_name["perplexity"].items, run.tasks["perplexity"]["results"][arm]):
            local = token_logprobs(hf_model, item["token_ids"], policy, served_profile[1])
            assert measured["tokens"] == local.numel()
            assert measured["logprob_sum"] == pytest.approx(float(local.sum()), abs=5e-3)
        # multiple choice: each letter's log-probability after the question
        for item, measured in zip(by_name["mmlu"].items, run.tasks["mmlu"]["results"][arm]):
            context = encode(multiple_choice_prompt(item))
            for letter, got in zip("ABCD", measured["choice_logprobs"]):
                local = token_logprobs(hf_model, context + encode(" " + letter), policy, served_profile[1])
                assert got == pytest.approx(float(local[len(context) - 1:].sum()), abs=1e-3)


def test_comparison_is_reproducible_from_the_saved_run(two_arms):
    _, run, path, _ = two_arms
    first, again = compare(run, seed=0), compare(EvalRun.load(path), seed=0)
    assert first == again
    ppl = first["tasks"]["perplexity"]["arms"]
    assert ppl["none"]["perplexity"] != ppl["act"]["perplexity"] and 0 <= ppl["act"]["pvalue_holm"] <= 1
    interval = ppl["act"]["nll_per_token_diff"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert math.isfinite(first["latency"]["act"]["ttft_ms"]["mean"])
    assert set(first["tasks"]["retrieval"]["arms"]["act"]["accuracy_by_length"]) == {"256"}
