"""The in-process evaluation target (transformers): same interface and numbers as teacher forcing,
a KV-cached generation under a policy equal to recomputing it from scratch, and a whole paired run."""

from __future__ import annotations

import pytest

from sinkguard.engines.hf.likelihood import token_logprobs
from sinkguard.errors import ConfigError
from sinkguard.evaluation import build_tasks
from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.local import local_clients
from sinkguard.evaluation.runner import evaluate
from sinkguard.interventions.policy import Policy, PolicySet
from sinkguard.interventions.specs import AttentionRedistribution, MlpProjectionRemoval

POLICIES = PolicySet(policies=[Policy(name="act", interventions=[AttentionRedistribution(beta=0.0)]),
                               Policy(name="remove", interventions=[MlpProjectionRemoval(alpha=1.0)])])


@pytest.fixture(scope="module")
def clients(hf_model, profile):
    return local_clients(hf_model, ["none", "act", "remove"], POLICIES, profile)


def test_prompt_logprobs_are_teacher_forcing_under_the_arm(clients, hf_model, default_scan, profile):
    tokens = default_scan.prompts[0].token_ids[:96]
    for arm in ("none", "act"):
        got = clients[arm].prompt_logprobs(tokens).logprobs
        expected = token_logprobs(hf_model, tokens, POLICIES.get(arm), profile)
        assert got[0] is None and got[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    edited, plain = (clients[arm].prompt_logprobs(tokens).logprobs[1:] for arm in ("act", "none"))
    assert edited != pytest.approx(plain, abs=1e-3)


@pytest.mark.parametrize("arm", ["act", "remove"])
def test_cached_generation_under_a_policy_equals_recomputing_it(clients, default_scan, arm):
    prompt = default_scan.prompts[1].token_ids[:80]
    generation = clients[arm].generate(prompt, max_tokens=8, top_logprobs=3)
    ids = clients[arm]._ids(prompt) + clients[arm].model.tokenizer(generation.text, add_special_tokens=False
                                                                   ).input_ids[:generation.output_tokens]
    recomputed = clients[arm].prompt_logprobs(ids).logprobs[len(prompt):]
    assert generation.output_tokens == 8 and len(generation.top_logprobs) == 8
    assert generation.token_logprobs == pytest.approx(recomputed[:len(generation.token_logprobs)], abs=2e-4)
    assert all(max(top.values()) == pytest.approx(lp, abs=1e-6)
               for top, lp in zip(generation.top_logprobs, generation.token_logprobs))  # greedy: the best
    assert generation.ttft_s > 0 and generation.tpot_s > 0


def test_a_local_paired_run_and_unknown_arms(clients, hf_model, profile):
    tasks = build_tasks(["perplexity", "mmlu"], hf_model.tokenizer, seed=3, perplexity_prompts=2,
                        perplexity_tokens=64, mmlu_items=3)
    encode = lambda text: list(hf_model.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    run = evaluate({arm: clients[arm] for arm in ("none", "act")}, tasks, encode, "none", progress=False)
    result = compare(run, seed=0)
    ppl = result["tasks"]["perplexity"]["arms"]
    assert ppl["act"]["perplexity"] != ppl["none"]["perplexity"]
    assert set(result["tasks"]["mmlu"]["arms"]) == {"none", "act"}
    with pytest.raises(ConfigError, match="nope"):
        local_clients(hf_model, ["none", "nope"], POLICIES, profile)


def test_sinkguard_eval_runs_in_process_without_a_server(hf_model, profile, tmp_path):
    from sinkguard.cli.main import main

    profile_dir = profile.save(tmp_path / "profile")
    (tmp_path / "policies.json").write_text(POLICIES.model_dump_json())
    out = tmp_path / "eval"
    assert main(["eval", "--engine", "transformers", "--profile", str(profile_dir), "--policies",
                 str(tmp_path / "policies.json"), "--arms", "none,remove", "--tasks", "perplexity",
                 "--out", str(out)]) == 0
    assert {"run.json", "comparison.json", "comparison.md", "report.html"} <= {p.name for p in out.iterdir()}
    assert main(["eval", "--engine", "transformers", "--profile", str(profile_dir), "--arms", "none,act",
                 "--tasks", "perplexity", "--out", str(out)]) != 0  # no policy file to take 'act' from
