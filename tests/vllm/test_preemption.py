"""Preempted and recomputed requests: a KV cache too small for the batch makes vLLM preempt requests
and later run them again from the start; their records count each token once and keep the events
of an engine that never preempted."""

from __future__ import annotations

import pytest

from sinkguard.config import ServeConfig
from sinkguard.engines.vllm.offline import generate

pytestmark = pytest.mark.slow


def key(event: dict) -> tuple:
    return event["position"], event["birth_layer"], event["lifetime"], event["kind"]


def test_recomputed_tokens_are_counted_once_and_events_not_duplicated(hf_model, online_prompts, served_profile,
                                                                       engine_outputs, tmp_path):
    config = tmp_path / "serve.json"
    config.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False).model_dump_json())
    prompts = online_prompts[:12]
    # 12 requests of 97 + 24 tokens need 12 x 8 blocks of 16; 24 blocks hold three at a time
    max_tokens = len(engine_outputs["tokens"][0])
    out = generate(hf_model.source.path, prompts, tmp_path / "run", max_tokens, config,
                   engine_args={"block_size": 16, "num_gpu_blocks_override": 24, "max_num_seqs": 6})
    assert out["tokens"] == engine_outputs["tokens"][:12]  # preemption changes nothing the user sees
    recomputed = 0
    for prompt, generated, found, alone in zip(prompts, out["tokens"], out["records"], engine_outputs["records"]):
        record = found[0]
        assert record["tokens_scanned"] == {"prefill": len(prompt), "decode": len(generated) - 1}
        positions = [e["position"] for e in record["events"]]
        assert len(positions) == len(set(positions))  # no event twice
        recomputed += record["recomputed_tokens"]
        same = {key(e) for e in record["events"]} & {key(e) for e in alone[0]["events"]}
        assert len(same) >= 0.9 * len(alone[0]["events"])
    assert recomputed > 0, "the tiny KV cache should have forced at least one preemption"
