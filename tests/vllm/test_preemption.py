"""Preempted and recomputed requests: a KV cache too small for the batch makes vLLM preempt requests
and later run them again from the start; their records count each token once and keep the events
of an engine that never preempted."""

from __future__ import annotations

import pytest
from harness.offline_engine import generate

from sinkguard.serving.settings import ServeConfig

pytestmark = pytest.mark.slow


def key(event: dict) -> tuple:
    return event["position"], event["birth_layer"], event["lifetime"], event["kind"]


def test_recomputed_tokens_are_counted_once_and_events_not_duplicated(hf_model, online_prompts, served_profile,
                                                                       tmp_path):
    config = tmp_path / "serve.json"
    config.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False).model_dump_json())
    # 96-token prompts fill 3 blocks of 32 (the CPU backend's block size) exactly; decoding needs a
    # 4th. 12 blocks admit 4 requests, which then cannot all grow: vLLM preempts and recomputes.
    prompts = [p[:96] for p in online_prompts[:12]]
    tight = generate(hf_model.source.path, prompts, tmp_path / "tight", 24, config,
                     engine_args={"block_size": 32, "num_gpu_blocks_override": 12, "max_model_len": 256})
    roomy = generate(hf_model.source.path, prompts, tmp_path / "roomy", 24, config,
                     engine_args={"block_size": 32, "max_model_len": 256})
    assert tight["tokens"] == roomy["tokens"]  # preemption changes nothing the user sees
    recomputed = 0
    for prompt, generated, found, alone in zip(prompts, tight["tokens"], tight["records"], roomy["records"]):
        record = found[0]
        assert record["tokens_scanned"] == {"prefill": len(prompt), "decode": len(generated) - 1}
        positions = [e["position"] for e in record["events"]]
        assert len(positions) == len(set(positions))  # no event twice
        recomputed += record["recomputed_tokens"]
        same = {key(e) for e in record["events"]} & {key(e) for e in alone[0]["events"]}
        assert len(same) >= 0.9 * len(alone[0]["events"])
    assert recomputed > 0, "the tiny KV cache should have forced at least one preemption"
