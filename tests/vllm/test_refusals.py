"""The plugin refuses settings under which detection would be silently wrong, with a clear message:
engine settings checked on vLLM's own config objects (built by vLLM's argument handling from the same
flags a user types), every model runner class vLLM ships covered, bad configs and profiles refused at
start-up, and the arguments `sinkguard serve` owns refused by name."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import script

from sinkguard.engines.vllm import plugin
from sinkguard.engines.vllm.launch import ENFORCED_ARGS, PIECEWISE_CUDA_GRAPHS, gpu_compilation_args, prepare_launch
from sinkguard.engines.vllm.refusals import REFUSALS, check_engine_settings, compiled_mode, refused_settings
from sinkguard.errors import ConfigError
from sinkguard.serving.loader import CONFIG_ENV, enabled_config
from sinkguard.serving.settings import ServeConfig, load_serve_config

SCRIPT = script("start_engine")


def start_engine(model_dir: Path, config_path: Path, **overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "SINKGUARD_CONFIG": str(config_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(model_dir), json.dumps(overrides)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def serve_config(tmp_path_factory, served_profile) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "serve.json"
    path.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False).model_dump_json())
    return path


def test_invalid_serve_config_names_the_field(tmp_path, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"profile": "x", "max_finished_requests": 0}))
    monkeypatch.setenv("SINKGUARD_CONFIG", str(path))
    with pytest.raises(ConfigError, match="max_finished_requests"):
        enabled_config()
    path.write_text(json.dumps({"profile": "x", "max_finshed_requests": 5}))
    with pytest.raises(ConfigError, match="max_finshed_requests"):
        enabled_config()
    path.write_text(json.dumps({"max_finished_requests": 5}))  # sinkguard serve fills the profile in
    assert load_serve_config(path).profile is None
    with pytest.raises(ConfigError, match="profile: required when vLLM is launched with the plugin directly"):
        enabled_config()
    monkeypatch.delenv("SINKGUARD_CONFIG")
    assert enabled_config() is None  # plugin inert without a config


def test_serve_runs_vllms_default_mode(tmp_path):
    """Compiled mode and prefix caching stay on; async scheduling is refused by name; a user's own
    --enforce-eager (the debugging path) goes through."""
    config = ServeConfig(profile="p")
    launch = prepare_launch(tmp_path, config, "m", extra_args=["--max-model-len", "512"])
    assert "--enforce-eager" not in launch.command and "--no-enable-prefix-caching" not in launch.command
    assert "--no-async-scheduling" in launch.command
    assert launch.env["VLLM_PLUGINS"] == "sinkguard" and Path(launch.env["PROMETHEUS_MULTIPROC_DIR"]).is_dir()
    with pytest.raises(ConfigError, match="--async-scheduling"):
        prepare_launch(tmp_path, config, "m", extra_args=["--async-scheduling"])
    assert "--enforce-eager" in prepare_launch(tmp_path, config, "m", extra_args=["--enforce-eager"]).command


@pytest.mark.slow
def test_engine_refuses_profile_of_other_weights(random_model_dir, serve_config):
    proc = start_engine(random_model_dir, serve_config, max_model_len=128)
    assert proc.returncode != 0 and "STARTED" not in proc.stdout
    assert "does not match model" in proc.stdout, proc.stdout[-3000:]


def test_profile_whose_detector_missed_its_targets_is_refused(served_profile):
    from sinkguard.core.profile import SinkProfile
    from sinkguard.serving.loader import check_profile_trust

    path, profile = served_profile
    check_profile_trust(profile, ServeConfig(profile=str(path)))  # a validated profile is served
    meta = profile.meta.model_copy(update={"validation": {**profile.meta.validation, "status": "below_target",
                                                          "message": "recall 0.40"}})
    doubtful = SinkProfile(meta, profile.tensors)
    with pytest.raises(ConfigError, match=r"status 'below_target' \(recall 0.40\).*allow_unvalidated_detector"):
        check_profile_trust(doubtful, ServeConfig(profile=str(path)))
    check_profile_trust(doubtful, ServeConfig(profile=str(path), allow_unvalidated_detector=True))


@pytest.mark.slow
def test_engine_refuses_an_architecture_without_a_contract(tmp_path, hf_model, serve_config):
    import torch
    import transformers

    config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=hf_model.info.vocab_size,
                                        max_position_embeddings=128, architectures=["GPTNeoXForCausalLM"])
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    hf_model.tokenizer.save_pretrained(tmp_path / "neox")
    proc = start_engine(tmp_path / "neox", serve_config, max_model_len=128)
    assert proc.returncode != 0 and "STARTED" not in proc.stdout
    assert "does not support the architecture GPTNeoXForCausalLM" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_engine_accepts_the_float32_profile_for_the_same_weights_in_bfloat16(hf_model, serve_config):
    """vLLM CPU's default dtype rounds every weight to bfloat16: same weights at another precision."""
    proc = start_engine(hf_model.source.path, serve_config, dtype="bfloat16")
    assert proc.returncode == 0 and "STARTED" in proc.stdout, proc.stdout[-3000:]


def test_invalid_policy_file_fails_start_up_naming_the_field(tmp_path, monkeypatch):
    policies = tmp_path / "policies.yaml"
    policies.write_text("policies:\n  - name: clamp\n    interventions:\n"
                        "      - {kind: mlp_norm_clamp, relative_norm: -1}\n")
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"profile": "p", "policies": str(policies)}))
    monkeypatch.setenv("SINKGUARD_CONFIG", str(config))
    with pytest.raises(ConfigError, match="relative_norm"):
        enabled_config()
    policies.write_text("default: act\npolicies: []\n")
    with pytest.raises(ConfigError, match="default policy 'act' is not defined"):
        enabled_config()


OWNED_FORMS = {  # vLLM arguments sinkguard serve sets, in forms vLLM's parser takes -> (vLLM option, sinkguard's)
    ("--port", "9001"): ("--port", "--port"), ("--port=9001",): ("--port", "--port"),
    ("--por", "9001"): ("--port", "--port"), ("--host=0.0.0.0",): ("--host", "--host"),
    ("--model", "/m"): ("--model", "--model"), ("--served_model_name", "x"): ("--served-model-name",) * 2,
    ("--served-model-name=x",): ("--served-model-name",) * 2, ("--shutdown-timeout", "5"): ("--shutdown-timeout",
                                                                                          "--drain-timeout"),
    ("--uds", "serve.sock"): ("--uds", "--host and --port"),
}


def test_serve_refuses_vllm_arguments_it_sets_itself_naming_its_option(tmp_path):
    """Given to vLLM as well, `--port N` made vLLM serve on N while `sinkguard serve` polled its own
    port: refused (every form vLLM's parser would take), naming the sinkguard serve option."""
    config = ServeConfig(profile="p")
    for args, (_, option) in OWNED_FORMS.items():
        with pytest.raises(ConfigError, match=f"set by sinkguard serve .*: use sinkguard serve's {option}$"):
            prepare_launch(tmp_path, config, "m", extra_args=["--enforce-eager", *args])
    launch = prepare_launch(tmp_path, config, "m", port=8123, extra_args=["--max-model-len", "512"], drain_timeout=7)
    assert launch.command[launch.command.index("--port") + 1] == "8123" and launch.command.count("--port") == 1
    assert launch.command[launch.command.index("--shutdown-timeout") + 1] == "7" and launch.drain_timeout == 7
    with pytest.raises(ConfigError, match="--drain-timeout must be in"):
        prepare_launch(tmp_path, config, "m", drain_timeout=-1)


def test_refused_forms_are_what_vllms_parser_reads_as_those_options():
    """The refusal matches vLLM's own parser: each refused form sets the owned option there, and no
    other vLLM option is a prefix of an owned one (so refusing prefixes refuses nothing else)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from sinkguard.engines.vllm.launch import OWNED_ARGS

    parser = make_arg_parser(FlexibleArgumentParser())
    options = {option for action in parser._actions for option in action.option_strings}
    assert set(OWNED_ARGS) <= options
    assert not [o[:k] for o in OWNED_ARGS for k in range(3, len(o)) if o[:k] in options]
    dests = {option: action.dest for action in parser._actions for option in action.option_strings}
    defaults = parser.parse_args([])
    for args, (option, _) in OWNED_FORMS.items():
        dest = dests[option]
        assert getattr(parser.parse_args(list(args)), dest) != getattr(defaults, dest), args


def run_serve(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sinkguard", "serve", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_serve_cli_refuses_an_owned_argument_and_an_occupied_port_in_one_line(served_profile):
    refused = run_serve("--profile", str(served_profile[0]), "--", "--port", "9001")
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        "sinkguard: error: sinkguard serve: the vLLM argument --port is set by sinkguard serve (vLLM would listen "
        "where sinkguard serve does not look): use sinkguard serve's --port"], refused.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        occupied = run_serve("--profile", str(served_profile[0]), "--port", str(port))
    assert occupied.returncode == 2 and occupied.stderr.splitlines() == [
        f"sinkguard: error: sinkguard serve: cannot listen on 127.0.0.1:{port} (Address already in use); another "
        "server is there? Choose another --port"], occupied.stderr
    assert "serving" not in occupied.stdout  # failed before anything was prepared, let alone vLLM started


# Engine settings, on vLLM's own config objects
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


def test_full_cuda_graphs_are_kept_for_an_observe_only_compiled_server(hf_model):
    """Observe-only, the compiled model runs no Python (statistics captured in the graph): vLLM's GPU
    default stays. A policy that edits runs Python inside the model: refused, naming it; `sinkguard
    serve` then passes piecewise CUDA graphs unless the user configured compilation."""
    from vllm.config import CUDAGraphMode

    config = engine_config(hf_model.source.path, enforce_eager=False)
    object.__setattr__(config.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL_AND_PIECEWISE)
    assert refused_settings(config, python_in_model=[]) == []
    check_engine_settings(config, python_in_model=[])
    with pytest.raises(ConfigError, match="full CUDA graph.* remove, act run Python inside the model"):
        check_engine_settings(config, python_in_model=["remove", "act"])
    assert gpu_compilation_args([], []) == []
    assert gpu_compilation_args(["remove"], []) == list(PIECEWISE_CUDA_GRAPHS)
    assert gpu_compilation_args(["remove"], ["-cc.cudagraph_mode=FULL"]) == []  # the user's choice, checked
    eager_capture = engine_config(hf_model.source.path, enforce_eager=False)  # graphs of the uncompiled model
    object.__setattr__(eager_capture.compilation_config, "mode", 0)
    object.__setattr__(eager_capture.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL)
    assert [r.setting for r in refused_settings(eager_capture, python_in_model=[])] == [
        "full CUDA graphs (compilation_config.cudagraph_mode)"]


def test_breakable_cuda_graphs_are_refused_by_name(hf_model, monkeypatch):
    """VLLM_USE_BREAKABLE_CUDAGRAPH captures the eager model, Python wrappers included, into CUDA
    graphs; the CPU platform captures none, so the graph mode is set on a real config object."""
    from vllm.config import CUDAGraphMode

    setting = "breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH)"
    for env, mode, refused in (("1", CUDAGraphMode.PIECEWISE, True), ("0", CUDAGraphMode.PIECEWISE, False),
                               ("1", CUDAGraphMode.NONE, False)):
        monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", env)
        config = engine_config(hf_model.source.path, enforce_eager=False)
        object.__setattr__(config.compilation_config, "cudagraph_mode", mode)
        assert [rule.setting for rule in refused_settings(config)] == ([setting] if refused else []), (env, mode)
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    config = engine_config(hf_model.source.path, enforce_eager=False)
    object.__setattr__(config.compilation_config, "cudagraph_mode", CUDAGraphMode.PIECEWISE)
    with pytest.raises(ConfigError, match="VLLM_USE_BREAKABLE_CUDAGRAPH=0"):
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
        except ImportError:  # a platform module this build cannot import (e.g. TPU, XPU kernels)
            continue
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and name.endswith("ModelRunner") and "load_model" in cls.__dict__:
                found.add((info.name, name))
    return found


def test_every_model_runner_vllm_ships_is_covered(monkeypatch, tmp_path):
    """Fails when vLLM grows a model runner (or moves one) that the plugin neither observes nor refuses
    on a platform it supports (XPU's runner defines no load_model of its own; XPU itself is refused)."""
    covered = {(module, name) for classes in plugin.PLATFORM_CLASSES.values() for module, name, _ in classes.runners}
    assert _runner_classes_defining_load_model() <= covered
    config = tmp_path / "serve.json"
    config.write_text(ServeConfig(profile="unused").model_dump_json())
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert plugin.platform_name() == "cpu"
    plugin.register()
    for module, name, _ in plugin.PLATFORM_CLASSES["cpu"].runners:
        cls = getattr(importlib.import_module(module), name)
        assert getattr(cls.load_model, "_sinkguard_wrapped", False), (module, name)
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    assert getattr(Worker.load_model, "_sinkguard_wrapped", False) and CPUWorker.load_model is Worker.load_model
    for worker in (Worker, CPUWorker):  # the compiled graph must call sinkguard's op (checked after warm-up)
        assert getattr(worker.compile_or_warm_up_model, "_sinkguard_wrapped", False), worker
