"""One real sinkguard-enabled vLLM server (OpenAI API) on the embedded model per test session.

Also: the embedded model's profile (calibrated on the fly and cached, as `sinkguard serve` does),
a prompt set of 50 token-id prompts cut from built-in text (BOS first), and the greedy outputs of
the same batch through an offline vLLM engine with and without sinkguard. Everything runs in
float32: vLLM's CPU default (bf16) would make detection coarser than the float32 profile.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.served_policies import POLICIES

from sinkguard.serving.settings import ServeConfig

MAX_TOKENS = 24
API_KEY = "sk-sinkguard-test"  # the server runs with --api-key, as production servers do
ADMIN_TOKEN = "admin-sinkguard-test"  # and a separate admin token for sinkguard's status and switch


@pytest.fixture(scope="session")
def served_profile():
    from sinkguard.offline.calibration import profile_for_model

    return profile_for_model(None)


@pytest.fixture(scope="session")
def online_prompts(hf_model) -> list[list[int]]:
    from sinkguard.sources.prompts import default_prompts

    prompts = default_prompts(lambda t: hf_model.tokenize(t, add_bos=False), count=50, tokens=96)
    bos = hf_model.tokenizer.bos_token_id
    return [[bos, *p.token_ids] for p in prompts]


def generate_offline(model_dir: Path, prompts: list[list[int]], folder: Path, config: Path | None = None) -> dict:
    """Greedy generation in a separate process with an offline vLLM engine (float32)."""
    from harness.offline_engine import generate

    return generate(model_dir, prompts, folder, MAX_TOKENS, config)


@pytest.fixture(scope="session")
def plain_outputs(hf_model, online_prompts, tmp_path_factory) -> list[list[int]]:
    """Greedy outputs of plain vLLM (plugin inert), same engine settings."""
    return generate_offline(hf_model.source.path, online_prompts, tmp_path_factory.mktemp("plain"))["tokens"]


@pytest.fixture(scope="session")
def policy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policies") / "policies.json"
    path.write_text(json.dumps(POLICIES))
    return path


@pytest.fixture(scope="session")
def engine_outputs(hf_model, online_prompts, served_profile, policy_file, tmp_path_factory) -> dict:
    """The same batch through a vLLM engine with sinkguard detecting (policies configured, none
    selected): tokens and sink records."""
    folder = tmp_path_factory.mktemp("sinkguard-engine")
    config = folder / "serve.json"
    config.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False,
                                  policies=str(policy_file)).model_dump_json())
    return generate_offline(hf_model.source.path, online_prompts, folder, config)


@pytest.fixture(scope="session")
def server(hf_model, served_profile, policy_file, plain_outputs, engine_outputs, tmp_path_factory):
    """The sinkguard server (started after the offline engines: they would share 2 cores)."""
    from sinkguard.engines.vllm.launch import free_port, prepare_launch
    from sinkguard.engines.vllm.server import RunningServer

    profile_path, _ = served_profile
    config = ServeConfig(profile=str(profile_path), max_finished_requests=512, policies=str(policy_file))
    launch = prepare_launch(hf_model.source.path, config,
                            "smol", port=free_port(),
                            # a small token budget per step splits the 97-token prompts into prefill chunks
                            extra_args=["--max-model-len", "2048", "--seed", "0", "--dtype", "float32",
                                        "--max-num-batched-tokens", "64", "--api-key", API_KEY],
                            workdir=tmp_path_factory.mktemp("serve"))
    launch.env["SINKGUARD_ADMIN_TOKEN"] = ADMIN_TOKEN
    with RunningServer(launch) as running:
        running.user_headers = {"Authorization": f"Bearer {API_KEY}"}
        running.admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        running.wait_ready(timeout=600)
        yield running
