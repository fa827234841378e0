"""MLP interventions in a real vLLM engine, per request in one batch, against the transformers engine."""

from __future__ import annotations

import json

import pytest
import torch

from sinkguard.config import ServeConfig
from sinkguard.engines.hf.interventions import intervening
from sinkguard.engines.vllm.offline import generate
from sinkguard.policy import load_policies

pytestmark = pytest.mark.slow
STEPS = 8
POLICIES = {"policies": [
    {"name": "remove", "interventions": [{"kind": "mlp_projection_removal", "alpha": 1.0}]},
    {"name": "clamp", "interventions": [{"kind": "mlp_norm_clamp", "relative_norm": 1.0}]},
]}


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


@pytest.fixture(scope="module")
def batch(hf_model, online_prompts, served_profile, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interventions")
    (folder / "policies.json").write_text(json.dumps(POLICIES))
    config = folder / "serve.json"
    config.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False,
                                  policies=str(folder / "policies.json")).model_dump_json())
    prompts = online_prompts[:6]
    names = ["none", "remove", "clamp", "remove", "none", "clamp"]
    out = generate(hf_model.source.path, prompts, folder / "run", STEPS, config,
                   engine_args={"max_num_batched_tokens": 64},  # chunked prefill, all six in one batch
                   extra_args=[{"sinkguard_policy": n} for n in names])
    return prompts, names, out, load_policies(folder / "policies.json")


def test_each_request_gets_its_own_policy_and_matches_transformers(batch, hf_model, served_profile):
    prompts, names, out, policies = batch
    worst = 0.0
    for prompt, name, tokens, logprobs, found in zip(prompts, names, out["tokens"], out["logprobs"], out["records"]):
        record = found[0]
        assert record["policy"] == name
        hf_tokens, hf_logprobs = hf_greedy(hf_model, prompt, policies.get(name), served_profile[1])
        assert tokens == hf_tokens, name
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, hf_logprobs)))
        if name == "none":
            assert record["interventions_applied"] == {} and record["interventions"] == []
        else:
            kind = policies.get(name).interventions[0].kind
            assert record["interventions_applied"].get(kind, 0) > 0, record
            assert all(e["position"] != 0 for e in record["interventions"])
    assert worst <= 1e-3, worst


def test_requests_without_a_policy_are_untouched_in_a_mixed_batch(batch, engine_outputs):
    prompts, names, out, _ = batch
    # the 'none' requests, batched with edited ones, generate what the observe-only engine generated
    for i, name in enumerate(names):
        if name == "none":
            assert out["tokens"][i] == engine_outputs["tokens"][i][:STEPS]
