"""sinkguard in vLLM's default mode: torch.compile'd model (Dynamo + Inductor on CPU) and prefix caching.

Engines run the same fixed program (``tests/harness/mode_program.py``), float32: plain vLLM in default mode,
sinkguard in default mode with policies configured (the layer op), sinkguard in eager mode without prefix
caching (the debugging path, the reference for events and interventions), and sinkguard observe-only in
default mode (statistics captured inside the graph); plus plain vLLM and observe-only sinkguard in bfloat16.
KV blocks of 32 tokens, so the 97-token prompts leave whole blocks in the prefix cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import script

from sinkguard.serving.settings import ServeConfig

SCRIPT = script("mode_program")
BLOCK = 32
MAX_TOKENS = 24
DEFAULT_MODE = {"enforce_eager": False, "enable_prefix_caching": True, "block_size": BLOCK}
EAGER_MODE = {"enforce_eager": True, "enable_prefix_caching": False, "block_size": BLOCK}
POLICY_RUNS = ("remove", "act", "zero")  # one MLP edit, attention redistribution, first-token scaling
# The same fresh prompts under one policy after another: each policy's first run comes after others ran on them
ISOLATION_ORDER = ("remove_1", "clamp_1", "remove_2", "act_1", "none_1", "act_2", "zero_1", "none_2", "zero_2",
                   "clamp_2")


def run_program(model_dir: Path, folder: Path, engine: dict, phases: list[dict], config: Path | None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"engine": engine, "phases": phases}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("SINKGUARD_CONFIG", None)
    if config is not None:
        env["SINKGUARD_CONFIG"] = str(config)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), str(plan), str(folder / "out.json")],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"engine program failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((folder / "out.json").read_text())


@pytest.fixture(scope="module")
def shared_prompts(online_prompts) -> list[list[int]]:
    """70 tokens of one prompt, then 29 of another: two whole cached blocks, then new tokens."""
    return [p[:70] + q[1:30] for p, q in zip(online_prompts[:10], online_prompts[10:20])]


@pytest.fixture(scope="module")
def fresh_prompts(hf_model) -> list[list[int]]:
    """Texts no other prompt of the program starts with (nothing of them is cached at first)."""
    from sinkguard.sources.prompts import default_prompts

    prompts = default_prompts(lambda t: hf_model.tokenize(t, add_bos=False), count=56, tokens=96)[50:53]
    return [[hf_model.tokenizer.bos_token_id, *p.token_ids] for p in prompts]


@pytest.fixture(scope="module")
def mode_config(tmp_path_factory, served_profile, policy_file) -> Path:
    path = tmp_path_factory.mktemp("mode-config") / "serve.json"
    path.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False,
                                policies=str(policy_file)).model_dump_json())
    return path


def batch_phase(online_prompts, shared_prompts) -> dict:
    return {"name": "batch", "prompts": online_prompts + shared_prompts, "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def default_mode(hf_model, online_prompts, shared_prompts, fresh_prompts, mode_config, tmp_path_factory) -> dict:
    """sinkguard in default mode: the batch, the same prompts again (whole-prompt cache hits), then
    each policy twice on fresh prompts with another policy in between."""
    phases = [batch_phase(online_prompts, shared_prompts),
              {"name": "again", "prompts": online_prompts[:20], "max_tokens": MAX_TOKENS}]
    phases += [{"name": name, "prompts": fresh_prompts, "policy": name.split("_")[0]} for name in ISOLATION_ORDER]
    return run_program(hf_model.source.path, tmp_path_factory.mktemp("default-mode"), DEFAULT_MODE, phases,
                       mode_config)


@pytest.fixture(scope="module")
def plain_default_mode(hf_model, online_prompts, shared_prompts, tmp_path_factory, default_mode) -> dict:
    return run_program(hf_model.source.path, tmp_path_factory.mktemp("plain-default"), DEFAULT_MODE,
                       [batch_phase(online_prompts, shared_prompts)], None)


@pytest.fixture(scope="module")
def eager_mode(hf_model, online_prompts, shared_prompts, fresh_prompts, mode_config, tmp_path_factory,
               plain_default_mode) -> dict:
    phases = [batch_phase(online_prompts, shared_prompts)]
    phases += [{"name": f"{policy}_1", "prompts": fresh_prompts, "policy": policy} for policy in POLICY_RUNS]
    return run_program(hf_model.source.path, tmp_path_factory.mktemp("eager-mode"), EAGER_MODE, phases, mode_config)


@pytest.fixture(scope="module")
def observe_config(tmp_path_factory, served_profile) -> Path:
    path = tmp_path_factory.mktemp("observe-config") / "serve.json"
    path.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False).model_dump_json())
    return path


@pytest.fixture(scope="module")
def observe_default_mode(hf_model, online_prompts, shared_prompts, observe_config, tmp_path_factory,
                         eager_mode) -> dict:
    """Observe-only sinkguard in default mode: the batch, then the same prompts again (cache hits)."""
    phases = [batch_phase(online_prompts, shared_prompts),
              {"name": "again", "prompts": online_prompts[:20], "max_tokens": MAX_TOKENS}]
    return run_program(hf_model.source.path, tmp_path_factory.mktemp("observe-default"), DEFAULT_MODE, phases,
                       observe_config)


@pytest.fixture(scope="module")
def bfloat16_default_mode(hf_model, online_prompts, shared_prompts, observe_config, mode_config, tmp_path_factory,
                          observe_default_mode) -> dict[str, dict]:
    """Plain vLLM, observe-only sinkguard and sinkguard with MLP and attention policies configured (the
    batch served ``none``), default mode in bfloat16, the same batch."""
    engine = {**DEFAULT_MODE, "dtype": "bfloat16"}
    phases = [batch_phase(online_prompts, shared_prompts)]
    return {name: run_program(hf_model.source.path, tmp_path_factory.mktemp(f"bf16-{name}"), engine, phases, config)
            for name, config in (("plain", None), ("sinkguard", observe_config), ("policies", mode_config))}


def events(result: dict) -> list[tuple]:
    return [(e["position"], e["kind"], e["birth_layer"], e["lifetime"], e["token_id"], e["phase"])
            for e in result["record"][0]["events"]]


def test_default_mode_runs_the_layer_op_inside_the_compiled_graph(default_mode):
    status = default_mode["status"]
    assert status["compiled"] and status["enabled"] and not status["zero_copy_capture"]
    assert status["layer_op_calls"] > 0 and status["unscanned_steps"] == 0 and not status["faults"]
    assert status["prefix_events"]["block_size"] == BLOCK and status["prefix_events"]["hits"] > 0
    assert status["prefix_events"]["misses"] == 0


@pytest.mark.parametrize("mode", ["default", "eager"])
def test_batch_layout_from_host_structures_is_what_the_model_runs(default_mode, eager_mode, mode):
    """The rows, requests and positions sinkguard reads from the runner's host-side structures (no
    attention metadata, no device tensor) equal the positions the runner hands the model and the
    attention metadata's row offsets, in every step: prefill chunks, prefix-cache hits, decode."""
    check = (default_mode if mode == "default" else eager_mode)["layout_check"]
    assert check["steps"] > 0 and check["tokens"] > check["steps"]
    assert check["mismatches"] == []


def test_greedy_outputs_identical_to_plain_vllm_in_default_mode(default_mode, plain_default_mode):
    ours, plain = default_mode["phases"]["batch"], plain_default_mode["phases"]["batch"]
    assert len(ours) >= 50
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in plain]
    assert [r["cached"] for r in ours] == [r["cached"] for r in plain]  # the same prefix-cache hits


def test_events_equal_the_eager_path_including_prefix_cache_hits(default_mode, eager_mode, online_prompts):
    compiled, eager = default_mode["phases"]["batch"], eager_mode["phases"]["batch"]
    assert [r["tokens"] for r in compiled] == [r["tokens"] for r in eager]
    hits = [r for r in compiled if r["cached"] > 0]
    assert len(hits) >= 5  # the shared-prefix prompts
    for ours, reference in zip(compiled, eager):
        record = ours["record"][0]
        assert record["cached_prefix_tokens"] == ours["cached"] and record["cached_prefix_unknown_tokens"] == 0
        assert record["tokens_scanned"]["prefill"] == record["prompt_tokens"] - ours["cached"]
        assert events(ours) == events(reference)
    for ours in hits:  # the prefix's events come back from the cached blocks
        assert any(e[0] < ours["cached"] for e in events(ours))
    again = default_mode["phases"]["again"]
    for ours, first in zip(again, compiled[:20]):
        assert ours["cached"] == 3 * BLOCK  # the whole prompt but its last token
        assert ours["tokens"] == first["tokens"] and events(ours) == events(first)


@pytest.mark.parametrize("policy", POLICY_RUNS)
def test_interventions_give_the_eager_log_probabilities(default_mode, eager_mode, policy):
    compiled, eager = default_mode["phases"][f"{policy}_1"], eager_mode["phases"][f"{policy}_1"]
    for ours, reference in zip(compiled, eager):
        assert ours["tokens"] == reference["tokens"]
        assert np.allclose(ours["logprobs"], reference["logprobs"], atol=1e-3)
        assert ours["record"][0]["interventions_applied"] == reference["record"][0]["interventions_applied"]
    assert any(r["record"][0]["interventions_applied"] for r in compiled)


@pytest.mark.parametrize("policy", ["remove", "clamp", "act", "none", "zero"])
def test_policies_never_share_cached_kv(default_mode, policy):
    """A policy's first run on prompts other policies already ran finds nothing cached; its second
    run hits what its first cached, and gets the same tokens, log-probabilities and events."""
    phases = default_mode["phases"]
    first, second = phases[f"{policy}_1"], phases[f"{policy}_2"]
    assert all(r["cached"] == 0 for r in first)
    assert all(r["cached"] == 3 * BLOCK for r in second)
    for again, original in zip(second, first):
        assert again["record"][0]["cached_prefix_tokens"] == again["cached"]
        assert again["tokens"] == original["tokens"]
        assert np.allclose(again["logprobs"], original["logprobs"], atol=1e-4)
        assert events(again) == events(original)


def test_observe_only_captures_inside_the_graph_without_splitting_it(observe_default_mode, default_mode):
    status = observe_default_mode["status"]
    assert status["compiled"] and status["enabled"] and status["capture"] == "in_graph"
    assert status["layer_op_calls"] > 0 and status["steps"] > 0  # the capture op ran in the compiled graph
    assert status["unscanned_steps"] == 0 and not status["faults"]
    assert not any(op.startswith("sinkguard::") for op in observe_default_mode["splitting_ops"])
    assert default_mode["status"]["capture"] == "layer_op"  # MLP and tracking policies decide per layer


def test_observe_only_in_graph_events_equal_the_eager_path(observe_default_mode, eager_mode, plain_default_mode):
    ours, eager = observe_default_mode["phases"]["batch"], eager_mode["phases"]["batch"]
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in plain_default_mode["phases"]["batch"]]
    assert sum(len(events(r)) for r in ours) > len(ours)  # sinks were found, not only the first token
    for result, reference in zip(ours, eager):
        record = result["record"][0]
        assert record["cached_prefix_tokens"] == result["cached"]
        assert record["tokens_scanned"]["prefill"] == record["prompt_tokens"] - result["cached"]
        assert events(result) == events(reference)
    for again, first in zip(observe_default_mode["phases"]["again"], ours[:20]):
        assert again["cached"] == 3 * BLOCK and events(again) == events(first)


def test_bfloat16_observe_only_outputs_identical_to_plain_vllm(bfloat16_default_mode):
    """Observe-only must not change a single token in bfloat16 either: the in-graph capture only reads
    the layer outputs with fusable ops, so Inductor rounds the residual stream where plain vLLM does."""
    plain = bfloat16_default_mode["plain"]["phases"]["batch"]
    ours = bfloat16_default_mode["sinkguard"]["phases"]["batch"]
    assert len(ours) >= 50 and bfloat16_default_mode["sinkguard"]["status"]["capture"] == "in_graph"
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in plain]
    assert sum(len(events(r)) for r in ours) > len(ours)


def test_bfloat16_requests_without_a_policy_match_plain_vllm_on_a_server_with_policies(bfloat16_default_mode):
    """A server configured with MLP and attention policies runs the edit op in every layer; requests
    served ``none`` still get plain vLLM's bfloat16 tokens: the op reads the MLP output alone."""
    plain = bfloat16_default_mode["plain"]["phases"]["batch"]
    ours = bfloat16_default_mode["policies"]["phases"]["batch"]
    assert bfloat16_default_mode["policies"]["status"]["capture"] == "layer_op"
    assert bfloat16_default_mode["policies"]["status"]["layer_op_calls"] > 0
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in plain]
    assert all(r["record"][0]["policy"] == "none" and not r["record"][0]["interventions_applied"] for r in ours)


def decode_steps(steps: list[dict]) -> list[dict]:
    return [s for s in steps if s["tokens"] == s["requests"]]


def test_steps_without_policies_never_read_device_data_on_the_host(observe_default_mode, default_mode, eager_mode):
    """In-graph capture queues the statistics' copy to pinned host memory at the step's end and reads it
    after sampling: not one host read of device data in sinkguard's hooks, in prefill or decode steps
    (``harness/host_reads.py`` counts item/tolist/numpy/cpu/blocking copies/data-dependent shapes), on
    an observe-only server and on a server with policies for requests served ``none``. The eager path
    reads its statistics back in every step. Deferred reading loses no step: every step the runner ran
    was accounted (and the events equal the eager path's: the tests above)."""
    after, before = observe_default_mode["host_reads"], eager_mode["host_reads"]
    assert len(decode_steps(after)) >= 10 and len(after) > len(decode_steps(after))
    assert [s for s in after if s["reads"]] == []
    unplanned = [s for s in default_mode["host_reads"] if s["phase"] in ("batch", "none_1", "none_2")]
    assert len(decode_steps(unplanned)) >= 10 and [s for s in unplanned if s["reads"]] == []
    assert min(s["reads"] for s in decode_steps(before) if s["phase"] == "batch") >= 2  # norms and cosines
    for result in (observe_default_mode, default_mode):
        assert result["status"]["steps"] == result["layout_check"]["steps"] == len(result["host_reads"])
