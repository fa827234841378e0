"""Engine settings that would make records wrong are refused by name, checked on vLLM's own config
objects (built by vLLM's argument handling from the same flags a user types), and every model
runner class vLLM ships is covered by the plugin."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from sinkguard.engines.vllm import plugin
from sinkguard.engines.vllm.refusals import REFUSALS, check_engine_settings, compiled_mode, refused_settings
from sinkguard.engines.vllm.server import ENFORCED_ARGS
from sinkguard.errors import ConfigError
from sinkguard.serving.loader import CONFIG_ENV
from sinkguard.serving.settings import ServeConfig


def engine_config(model_dir, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    args = {"model": str(model_dir), "max_model_len": 512, "enforce_eager": True, "enable_prefix_caching": False,
            "async_scheduling": False, **overrides}
    return EngineArgs(**args).create_engine_config()


def test_sinkguard_serve_settings_pass(hf_model):
    assert "--no-async-scheduling" in ENFORCED_ARGS
    check_engine_settings(engine_config(hf_model.source.path))


def test_vllms_default_mode_passes(hf_model):
    """torch.compile and prefix caching, as vLLM runs by default."""
    config = engine_config(hf_model.source.path, enforce_eager=False, enable_prefix_caching=True)
    assert compiled_mode(config) and config.cache_config.enable_prefix_caching
    check_engine_settings(config)


def test_full_cuda_graphs_are_refused_by_name(hf_model):
    """vLLM's GPU default captures decode steps as full CUDA graphs, where no Python runs. The CPU
    platform captures none, so the mode is set on a real config object here."""
    from vllm.config import CUDAGraphMode

    for mode, refused in ((CUDAGraphMode.FULL_AND_PIECEWISE, True), (CUDAGraphMode.FULL_DECODE_ONLY, True),
                          (CUDAGraphMode.FULL, True), (CUDAGraphMode.PIECEWISE, False)):
        config = engine_config(hf_model.source.path, enforce_eager=False)
        object.__setattr__(config.compilation_config, "cudagraph_mode", mode)
        names = [rule.setting for rule in refused_settings(config)]
        assert names == (["full CUDA graphs (compilation_config.cudagraph_mode)"] if refused else []), mode
    with pytest.raises(ConfigError, match="cudagraph_mode=PIECEWISE"):
        config = engine_config(hf_model.source.path, enforce_eager=False)
        object.__setattr__(config.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL_AND_PIECEWISE)
        check_engine_settings(config)


# Settings vLLM accepts on this CPU machine, passed as engine arguments.
ACCEPTED_HERE = {
    "speculative decoding": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                                    "prompt_lookup_max": 3}},
    "KV connectors and KV offloading": {"kv_offloading_size": 1.0},
    "data parallelism": {"data_parallel_size": 2},
    "LoRA adapters": {"enable_lora": True},
}


@pytest.mark.parametrize("setting", sorted(ACCEPTED_HERE))
def test_engine_argument_is_refused_by_name(hf_model, setting):
    config = engine_config(hf_model.source.path, **ACCEPTED_HERE[setting])
    assert [rule.setting for rule in refused_settings(config)] == [setting]
    with pytest.raises(ConfigError, match="sinkguard cannot observe this engine") as error:
        check_engine_settings(config)
    rule = next(r for r in REFUSALS if r.setting == setting)
    assert rule.fix in str(error.value)


def test_v2_model_runner_is_refused_by_name(hf_model, monkeypatch):
    """vLLM's CPU platform cannot build a V2 runner (it needs Triton); on GPU it is the default. The
    refusal reads the same property vLLM's workers read to pick their runner."""
    config = engine_config(hf_model.source.path)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert config.use_v2_model_runner
    assert [rule.setting for rule in refused_settings(config)] == ["the V2 model runner"]
    with pytest.raises(ConfigError, match="set VLLM_USE_V2_MODEL_RUNNER=0"):
        check_engine_settings(config)


def test_gpu_only_defaults_are_refused_by_name(hf_model):
    """vLLM's CPU platform switches these off (async scheduling and micro-batching: unsupported),
    while on GPU async scheduling is on by default. The refusal reads the same config fields vLLM's
    GPU worker reads, so they are set here on a real config object."""
    for field, value, setting in (
        ("scheduler_config.async_scheduling", True, "async scheduling"),
        ("parallel_config.enable_dbo", True, "micro-batching"),
        ("parallel_config.pipeline_parallel_size", 2, "pipeline parallelism"),
    ):
        config = engine_config(hf_model.source.path)
        owner_path, _, name = field.rpartition(".")
        owner = config
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part)
        object.__setattr__(owner, name, value)
        assert [rule.setting for rule in refused_settings(config)] == [setting], field
        with pytest.raises(ConfigError, match=setting.split()[0]):
            check_engine_settings(config)


def _runner_classes_defining_load_model() -> set[tuple[str, str]]:
    import vllm.v1.worker

    found = set()
    for info in pkgutil.walk_packages(vllm.v1.worker.__path__, "vllm.v1.worker."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # a platform module this build cannot import (e.g. TPU, XPU kernels)
            continue
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and name.endswith("ModelRunner") and "load_model" in cls.__dict__:
                found.add((info.name, name))
    return found


def test_every_model_runner_vllm_ships_is_covered(monkeypatch, tmp_path):
    """Fails when vLLM grows a model runner (or moves one) that the plugin neither observes nor refuses."""
    covered = {(module, name) for module, name, _ in plugin.RUNNER_CLASSES}
    assert _runner_classes_defining_load_model() <= covered
    config = tmp_path / "serve.json"
    config.write_text(ServeConfig(profile="unused").model_dump_json())
    monkeypatch.setenv(CONFIG_ENV, str(config))
    plugin.register()
    for module, name, _ in plugin.RUNNER_CLASSES:
        cls = getattr(importlib.import_module(module), name)
        assert getattr(cls.load_model, "_sinkguard_wrapped", False), (module, name)
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    assert getattr(Worker.load_model, "_sinkguard_wrapped", False) and CPUWorker.load_model is Worker.load_model
    for worker in (Worker, CPUWorker):  # the compiled graph must call sinkguard's op (checked after warm-up)
        assert getattr(worker.compile_or_warm_up_model, "_sinkguard_wrapped", False), worker
