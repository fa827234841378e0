"""The plugin imports and wraps only the running platform's worker and runner classes: on a GPU,
vLLM's CPU worker module (which replaces ``torch.cuda.Event``, streams and ``pin_memory`` when
imported) is never imported. Each case runs ``register()`` in a fresh process with a simulated
platform (``tests/harness/simulated_platform.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness import script

from sinkguard.serving.settings import ServeConfig


@pytest.fixture(scope="module")
def config_env(tmp_path_factory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("platform") / "serve.json"
    path.write_text(ServeConfig(profile="unused").model_dump_json())
    return {**os.environ, "SINKGUARD_CONFIG": str(path)}


def simulate(env: dict[str, str], *args: str) -> dict:
    done = subprocess.run([sys.executable, str(script("simulated_platform")), *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("SIMULATED ")), None)
    assert done.returncode == 0 and line is not None, done.stdout[-3000:]
    return json.loads(line.removeprefix("SIMULATED "))


def test_on_a_gpu_register_imports_no_cpu_module_and_leaves_torch_cuda_alone(config_env):
    result = simulate(config_env, "cuda")
    assert result["platform"] == "cuda" and result["error"] is None
    assert not [m for m in result["requested"] if m.startswith("vllm.v1.worker.cpu")], result["requested"]
    assert result["loaded_cpu_modules"] == [] and result["torch_replaced"] == []
    assert result["wrapped"] == ["vllm.v1.worker.gpu.model_runner.GPUModelRunner",
                                 "vllm.v1.worker.gpu_model_runner.GPUModelRunner", "vllm.v1.worker.gpu_worker.Worker"]


def test_the_simulation_sees_a_cpu_worker_import_that_patches_torch(config_env):
    """The control: had the plugin imported vLLM's CPU worker, the record would show it."""
    result = simulate(config_env, "cuda", "--import-cpu-worker")
    assert "vllm.v1.worker.cpu.shm" in result["loaded_cpu_modules"]
    assert {"cuda.Event", "cuda.current_stream", "Tensor.pin_memory"} <= set(result["torch_replaced"])


def test_a_platform_sinkguard_was_not_checked_on_is_refused_by_name(config_env):
    result = simulate(config_env, "xpu")
    assert result["error"].startswith("ConfigError: sinkguard supports vLLM's cpu and cuda platforms")
    assert "'xpu'" in result["error"] and result["wrapped"] == [] and result["torch_replaced"] == []
