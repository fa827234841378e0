"""`sinkguard eval` against the real server: two arms, numbers equal to an in-process computation."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest

from sinkguard.engines.hf.likelihood import token_logprobs
from sinkguard.evaluation import build_tasks
from sinkguard.evaluation.client import ArmClient
from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.html_report import eval_report_html
from sinkguard.evaluation.runner import EvalRun, evaluate
from sinkguard.evaluation.tasks import multiple_choice_prompt
from sinkguard.interventions.policy import load_policies


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


def _records(server, response_id: str) -> list[dict]:
    request = urllib.request.Request(f"{server.base_url}/sinkguard/requests/{response_id}?limit=1024",
                                     headers=server.user_headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["requests"]


def test_sink_statistics_per_arm_come_from_the_server_records(two_arms, server):
    tasks, run, path, _ = two_arms
    stats = run.sink_stats
    assert stats["available"] and EvalRun.load(path).sink_stats == stats
    requests = {"perplexity": 2, "mmlu": 4 * 4, "retrieval": 2}  # one per letter of each MMLU item
    for arm in ("none", "act"):
        per_task, overall = stats["arms"][arm]["tasks"], stats["arms"][arm]["all"]
        for name, count in requests.items():
            assert per_task[name]["requests"] == per_task[name]["records"] == count and per_task[name]["missing"] == 0
        # teacher forcing scans exactly the prompt (no prefix caching, no decode step for max_tokens=1)
        ppl_tokens = sum(len(item["token_ids"]) for item in tasks[0].items)
        assert per_task["perplexity"]["tokens_scanned"] == ppl_tokens
        assert overall["tokens_scanned"] == sum(s["tokens_scanned"] for s in per_task.values())
        secondary = overall["sink_counts"]["secondary"]
        assert overall["secondary_per_1k_tokens"] == pytest.approx(1000 * secondary / overall["tokens_scanned"])
        # the listed events agree with the server's own counter; each is active for its lifetime (>= 1 layer)
        if overall["events_dropped"] == 0:
            assert overall["secondary_events_listed"] == secondary
        assert sum(overall["secondary_active_by_layer"]) >= overall["secondary_events_listed"]
        per_1k = overall["secondary_active_per_1k_tokens_by_layer"]
        active = sum(overall["secondary_active_by_layer"])
        assert sum(per_1k) == pytest.approx(1000 * active / overall["tokens_scanned"])
        # the perplexity requests' records read directly: active layers = last - birth + 1 per secondary sink
        records = [r for row in run.tasks["perplexity"]["results"][arm] for r in _records(server, row["response_id"])]
        events = [e for r in records for e in r["events"] if e["kind"] == "secondary" and not e["is_reference"]]
        assert sum(per_task["perplexity"]["secondary_active_by_layer"]) == \
            sum(e["last_layer"] - e["birth_layer"] + 1 for e in events)
    assert stats["arms"]["none"]["all"]["interventions_applied"] == {}
    assert stats["arms"]["act"]["all"]["interventions_applied"].get("attention_redistribution", 0) > 0
    comparison = compare(run)
    layers = comparison["sink_stats"]["arms"]
    assert len(layers["none"]["secondary_active_by_layer"]) == len(layers["act"]["secondary_active_by_layer"])
    assert "Secondary sinks active per layer" in eval_report_html(run, comparison)  # the report takes real output


def test_generation_agreement_equals_the_in_process_engine(two_arms, hf_model, served_profile, policy_file):
    """KL and top-1 agreement of act vs none on the retrieval generations: the server's numbers equal
    the same quantities computed from an in-process transformers run of both arms."""
    from sinkguard.evaluation.compare import agreement
    from sinkguard.evaluation.local import local_clients

    tasks, run, _, _ = two_arms
    local = local_clients(hf_model, ["none", "act"], load_policies(policy_file), served_profile[1])
    retrieval = next(t for t in tasks if t.name == "retrieval")
    served = run.tasks["retrieval"]["results"]
    compared = 0
    for index, item in enumerate(retrieval.items):
        generated = {arm: local[arm].generate(item["prompt"], retrieval.max_tokens, top_logprobs=5)
                     for arm in ("none", "act")}
        for arm in ("none", "act"):  # same greedy text and per-token log-probabilities
            assert generated[arm].text == served[arm][index]["text"]
            assert generated[arm].token_logprobs == pytest.approx(served[arm][index]["token_logprobs"], abs=2e-3)
        mine = agreement({"top_logprobs": generated["none"].top_logprobs},
                         {"top_logprobs": generated["act"].top_logprobs})
        theirs = agreement(served["none"][index], served["act"][index])
        assert mine["first_divergence"] == theirs["first_divergence"] and mine["top1"] == theirs["top1"]
        assert mine["kl"] == pytest.approx(theirs["kl"], abs=2e-3)
        compared += len(mine["kl"])
    assert compared >= 4
