"""lm-evaluation-harness against the real server, one arm per model name: its per-item log-likelihoods
equal `sinkguard eval`'s on the same arm, and its samples (in memory or as files) become a paired run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sinkguard.evaluation.client import ArmClient
from sinkguard.evaluation.compare import compare
from sinkguard.evaluation.datasets import load_multiple_choice
from sinkguard.evaluation.lm_eval_interop import (
    LOCAL_TASKS,
    OFFLINE_ENV,
    measurement,
    read_output_folder,
    run_lm_eval,
    to_eval_run,
)
from sinkguard.evaluation.tasks import Task, measure

ARMS = ("none", "act")
DOCS = 4  # first documents of each local task
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def api_key(server) -> str:
    return server.user_headers["Authorization"].split(" ", 1)[1]


@pytest.fixture(scope="module")
def encode(hf_model):
    return lambda text: list(hf_model.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def lm_eval_outputs(server, hf_model, api_key):
    return {arm: run_lm_eval(server.base_url, "smol", arm, ["sinkguard_mc", "sinkguard_ppl"], hf_model.source.path,
                             api_key=api_key, num_concurrent=2, limit=DOCS) for arm in ARMS}


def _by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


def test_lm_eval_gives_the_same_loglikelihoods_as_sinkguard_eval(lm_eval_outputs, server, hf_model, api_key, encode):
    items = load_multiple_choice(LOCAL_TASKS / "sinkguard_mc.jsonl")[:DOCS]  # the JSONL sinkguard eval reads too
    texts = [s["doc"]["text"] for s in _by_doc(lm_eval_outputs["none"].samples["sinkguard_ppl"])]
    bos = [hf_model.tokenizer.bos_token_id]  # lm-eval's rolling windows start after it, as sinkguard's perplexity
    mc = Task("mc", "multiple_choice", items)
    ppl = Task("ppl", "perplexity", [{"token_ids": bos + encode(t)} for t in texts])
    deltas, choices = [], {}
    for arm in ARMS:
        client = ArmClient(server.base_url, "smol", arm, api_key)
        samples = _by_doc(lm_eval_outputs[arm].samples["sinkguard_mc"])
        assert len(samples) == DOCS
        for item, sample in zip(items, samples):
            ours, theirs = measure(mc, item, client, encode), measurement("multiple_choice", sample, encode)
            assert len(ours["choice_logprobs"]) == len(theirs["choice_logprobs"]) == 4
            deltas += [abs(a - b) for a, b in zip(ours["choice_logprobs"], theirs["choice_logprobs"])]
            assert ours["predicted"] == theirs["predicted"] and ours["correct"] == theirs["correct"]
            choices.setdefault(arm, []).append(theirs["choice_logprobs"])
        for item, sample in zip(ppl.items, _by_doc(lm_eval_outputs[arm].samples["sinkguard_ppl"])):
            ours, theirs = measure(ppl, item, client, encode), measurement("perplexity", sample, encode)
            assert ours["tokens"] == theirs["tokens"]
            deltas.append(abs(ours["logprob_sum"] - theirs["logprob_sum"]))
    print(f"lm-eval vs sinkguard eval: {len(deltas)} log-likelihoods, max |delta| {max(deltas):.3g}")
    assert max(deltas) <= TOLERANCE
    assert choices["none"] != choices["act"]  # the model name selected the arm


def test_the_converted_run_is_compared_paired(lm_eval_outputs, encode):
    run = to_eval_run(lm_eval_outputs, "none", encode, {"served_model": "smol"})
    result = compare(run)
    assert set(result["tasks"]) == {"sinkguard_mc", "sinkguard_ppl"} and result["tests"] == 2
    mc, ppl = result["tasks"]["sinkguard_mc"]["arms"]["act"], result["tasks"]["sinkguard_ppl"]["arms"]["act"]
    assert {"accuracy", "accuracy_diff", "discordant", "pvalue", "pvalue_holm", "significant"} <= set(mc)
    assert {"perplexity", "nll_per_token_diff", "pvalue", "pvalue_holm", "significant"} <= set(ppl)
    assert result["tasks"]["sinkguard_mc"]["items"] == DOCS
    assert run.config["lm_eval"]["aggregates"]["act"]["sinkguard_mc"]["alias"] == "sinkguard_mc"


def test_plain_lm_eval_cli_samples_read_back_to_the_same_run(lm_eval_outputs, server, hf_model, api_key, encode,
                                                             tmp_path):
    """The documented route without sinkguard's wrapper: lm_eval's own CLI (from another directory), then
    its --log_samples folder read back."""
    model_args = (f"base_url={server.base_url}/v1/completions,model=smol:act,tokenizer={hf_model.source.path},"
                  "tokenizer_backend=huggingface,num_concurrent=2")
    env = {**os.environ, **OFFLINE_ENV, "OPENAI_API_KEY": api_key}
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
                    "--tasks", "sinkguard_mc", "--include_path", str(LOCAL_TASKS), "--limit", str(DOCS),
                    "--output_path", str(tmp_path / "out"), "--log_samples"], check=True, env=env, cwd=tmp_path,
                   timeout=900)
    from_files = read_output_folder(tmp_path / "out", "smol:act")
    in_memory = to_eval_run({"act": lm_eval_outputs["act"]}, "act", encode).tasks["sinkguard_mc"]
    converted = to_eval_run({"act": from_files}, "act", encode).tasks["sinkguard_mc"]
    assert converted["items"] == in_memory["items"]
    for got, want in zip(converted["results"]["act"], in_memory["results"]["act"]):
        assert got["choice_logprobs"] == pytest.approx(want["choice_logprobs"], abs=TOLERANCE)
