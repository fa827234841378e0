"""The plugin refuses settings under which detection would be silently wrong, with a clear message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import script

from sinkguard.engines.vllm.server import prepare_launch
from sinkguard.errors import ConfigError
from sinkguard.serving.loader import enabled_config
from sinkguard.serving.settings import ServeConfig

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

    from sinkguard.engines.vllm.server import OWNED_ARGS

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
