"""One real sinkguard-enabled vLLM server (OpenAI API) on the embedded model per test session.

Also: the embedded model's profile (calibrated on the fly and cached, as `sinkguard serve` does)
and a prompt set of 50 token-id prompts cut from built-in text, BOS first.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sinkguard.config import ServeConfig

MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served_profile():
    from sinkguard.calibrate import profile_for_model

    return profile_for_model(None)


@pytest.fixture(scope="session")
def online_prompts(hf_model) -> list[list[int]]:
    from sinkguard.prompts import default_prompts

    prompts = default_prompts(lambda t: hf_model.tokenize(t, add_bos=False), count=50, tokens=96)
    bos = hf_model.tokenizer.bos_token_id
    return [[bos, *p.token_ids] for p in prompts]


@pytest.fixture(scope="session")
def plain_outputs(hf_model, online_prompts, tmp_path_factory) -> list[list[int]]:
    """Greedy outputs of plain vLLM (no plugin), same settings, in a separate process."""
    folder = tmp_path_factory.mktemp("plain")
    (folder / "prompts.json").write_text(json.dumps(online_prompts))
    script = Path(__file__).with_name("plain_generate.py")
    proc = subprocess.run([sys.executable, str(script), str(hf_model.source.path), str(folder / "prompts.json"),
                           str(folder / "out.json"), str(MAX_TOKENS)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "out.json").read_text())


@pytest.fixture(scope="session")
def server(hf_model, served_profile, plain_outputs, tmp_path_factory):
    """The sinkguard server (started after the plain run: two engines would share 2 cores)."""
    from sinkguard.engines.vllm.server import RunningServer, prepare_launch

    profile_path, _ = served_profile
    launch = prepare_launch(hf_model.source.path, ServeConfig(profile=str(profile_path), max_finished_requests=512),
                            "smol", port=free_port(), extra_args=["--max-model-len", "2048", "--seed", "0"],
                            workdir=tmp_path_factory.mktemp("serve"))
    with RunningServer(launch) as running:
        running.wait_ready(timeout=600)
        yield running
