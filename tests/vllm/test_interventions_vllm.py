"""Interventions in a real vLLM engine, per request in one batch, against the transformers engine."""

from __future__ import annotations

import json

import pytest
import torch
from harness.offline_engine import generate

from sinkguard.engines.hf.interventions import intervening
from sinkguard.interventions.policy import load_policies
from sinkguard.serving.settings import ServeConfig

pytestmark = pytest.mark.slow
STEPS = 8
NAMES = ["none", "remove", "clamp", "act", "zero", "act_decode", "none", "act", "inline"]
# the same policy sent inline (allowed in this engine's policy file) runs exactly as the configured one
INLINE_AS = "act"


def hf_greedy(hf_model, prompt: list[int], policy, profile) -> tuple[list[int], list[float]]:
    """Greedy decoding with a KV cache in transformers, the policy applied to every forward call."""
    tokens, logprobs = [], []
    with intervening(hf_model, policy, len(prompt), profile), torch.no_grad():
        output = hf_model.model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(STEPS):
            scores = torch.log_softmax(output.logits[0, -1].double(), dim=-1)
            token = int(scores.argmax())
            tokens.append(token)
            logprobs.append(float(scores[token]))
            output = hf_model.model(input_ids=torch.tensor([[token]]), past_key_values=output.past_key_values,
                                    use_cache=True)
    return tokens, logprobs


def policies_with_inline() -> dict:
    from harness.served_policies import POLICIES

    return {**POLICIES, "allow_inline": True}


def xargs(name: str) -> dict:
    if name != "inline":
        return {"sinkguard_policy": name}
    configured = next(p for p in policies_with_inline()["policies"] if p["name"] == INLINE_AS)
    return {"sinkguard_inline_policy": json.dumps({"interventions": configured["interventions"]})}


@pytest.fixture(scope="module")
def batch(hf_model, online_prompts, served_profile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interventions")
    (folder / "policies.json").write_text(json.dumps(policies_with_inline()))
    config = folder / "serve.json"
    config.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False,
                                  policies=str(folder / "policies.json")).model_dump_json())
    prompts = online_prompts[:len(NAMES)]
    out = generate(hf_model.source.path, prompts, folder / "run", STEPS, config,
                   engine_args={"max_num_batched_tokens": 64},  # chunked prefill, all nine in one batch
                   extra_args=[xargs(n) for n in NAMES])
    return prompts, NAMES, out, load_policies(folder / "policies.json")


def test_each_request_gets_its_own_policy_and_matches_transformers(batch, hf_model, served_profile):
    """Every intervention, nine requests on seven policies (one inline) in one batch with chunked prefill: the same
    greedy tokens as transformers under the same policy, next-token log-probabilities within 1e-3
    (measured: ~4e-5), and each policy visibly changes the log-probabilities it is compared on."""
    prompts, names, out, policies = batch
    worst = 0.0
    for prompt, name, tokens, logprobs, found in zip(prompts, names, out["tokens"], out["logprobs"], out["records"]):
        record = found[0]
        assert record["policy"] == name
        name = INLINE_AS if name == "inline" else name
        hf_tokens, hf_logprobs = hf_greedy(hf_model, prompt, policies.get(name), served_profile[1])
        assert tokens == hf_tokens, name
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, hf_logprobs)))
        if name == "none":
            assert record["interventions_applied"] == {} and record["interventions"] == []
            continue
        kind = policies.get(name).interventions[0].kind
        assert record["interventions_applied"].get(kind, 0) > 0, record
        primary = [e["position"] == 0 for e in record["interventions"]]
        assert all(primary) if kind == "first_token_scaling" else not any(primary)
        if name == "act_decode":  # decode queries only, yet steered away from sinks the prompt formed
            assert any(e["position"] < len(prompt) for e in record["interventions"])
        _, plain_logprobs = hf_greedy(hf_model, prompt, policies.get("none"), served_profile[1])
        assert max(abs(a - b) for a, b in zip(hf_logprobs, plain_logprobs)) > 1e-3, f"{name} changed nothing"
    assert worst <= 1e-3, worst


def test_requests_without_a_policy_are_untouched_in_a_mixed_batch(batch, plain_outputs):
    prompts, names, out, _ = batch
    # the 'none' requests, batched with edited ones, generate what plain vLLM generated
    for i, name in enumerate(names):
        if name == "none":
            assert out["tokens"][i] == plain_outputs[i][:STEPS]


def test_a_fault_inside_an_intervention_leaves_the_request_unmodified(hf_model, online_prompts, served_profile,
                                                                       plain_outputs, tmp_path_factory):
    """Fail-open: an attention edit that raises on every step serves every request as plain vLLM would."""
    folder = tmp_path_factory.mktemp("intervention-fault")
    (folder / "policies.json").write_text(json.dumps(policies_with_inline()))
    config = folder / "serve.json"
    config.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False, policies=str(folder / "policies.json"),
                                  fault_limit=1000, fault_injection={"stage": "intervention", "every_steps": 1}
                                  ).model_dump_json())
    names = ["act", "zero", "none", "act"]
    out = generate(hf_model.source.path, online_prompts[:4], folder / "run", STEPS, config,
                   extra_args=[{"sinkguard_policy": n} for n in names])
    for i, name in enumerate(names):
        assert out["tokens"][i] == plain_outputs[i][:STEPS], name
        record = out["records"][i][0]
        assert record["interventions_applied"] == {}
        assert record["unscanned_steps"] > 0  # the faulting steps were served unobserved, and counted
