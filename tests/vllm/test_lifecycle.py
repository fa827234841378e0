"""`sinkguard serve` as an operator runs it: it survives detector faults, stops completely on
SIGTERM / SIGINT (no orphaned vLLM process, port free), and refuses to serve unobserved."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sinkguard.config import FaultInjection, ServeConfig
from sinkguard.engines.vllm.server import free_port, http_json

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (SO_REUSEADDR, as uvicorn binds: connections of
    the old server lingering in TIME_WAIT do not count, a listener does)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Serve:
    """A `sinkguard serve` process (the CLI, as an operator starts it)."""

    def __init__(self, model_dir: Path, profile: Path, workdir: Path, config: ServeConfig | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        config_path = workdir / "serve.json"
        config_path.write_text((config or ServeConfig(profile=str(profile))).model_dump_json())
        self.log = workdir / "serve.out"
        command = [sys.executable, "-m", "sinkguard", "serve", "--model", str(model_dir), "--profile", str(profile),
                   "--config", str(config_path), "--port", str(self.port), "--max-model-len", "1024",
                   "--dtype", "float32", *(extra or [])]
        self.process = subprocess.Popen(command, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, cwd=workdir)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, self.output()[-3000:]
            if "ready (detector installed in every worker)" in self.output():
                return
            time.sleep(1)
        raise TimeoutError(self.output()[-3000:])

    def stop_with(self, signum: int) -> None:
        """Send ``signum`` to `sinkguard serve` only, as systemd / Docker / Kubernetes would, and
        check that everything it started is gone and the port is free."""
        tree = descendants(self.process.pid)
        assert tree, "the server should be running"
        self.process.send_signal(signum)
        assert self.process.wait(timeout=90) == 0, self.output()[-3000:]
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in tree):
            time.sleep(0.5)
        assert not [p for p in tree if alive(p)], "orphaned server processes"
        assert port_free(self.port)


def completion(base_url: str, prompt: list[int], max_tokens: int = 16) -> tuple[int, dict]:
    return http_json(base_url + "/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": prompt,
                                                    "max_tokens": max_tokens, "temperature": 0.0})


def test_faults_are_served_unobserved_until_the_detector_removes_itself_then_sigterm(
        hf_model, served_profile, online_prompts, tmp_path):
    config = ServeConfig(profile=str(served_profile[0]), fault_limit=6,
                         fault_injection=FaultInjection(stage="layer", every_steps=3))
    serve = Serve(hf_model.source.path, served_profile[0], tmp_path, config)
    try:
        serve.wait_ready()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: completion(serve.base_url, p), online_prompts[:16]))
        assert [status for status, _ in answers] == [200] * 16, answers
        assert all(len(body["choices"][0]["text"]) > 0 for _, body in answers)
        status, body = http_json(serve.base_url + "/sinkguard/status")
        worker = body["workers"][0]
        assert worker["runtime"] and not worker["enabled"] and "removed after 6 detector faults" in \
            worker["removed_reason"] and worker["faults"] == {"layer": 6}
        # requests served during a faulted step say so in their records; those that arrived after the
        # detector removed itself were never observed and have none
        found = [http_json(serve.base_url + f"/sinkguard/requests/{b['id']}") for _, b in answers]
        assert {status for status, _ in found} <= {200, 404}
        assert sum(body["requests"][0]["unscanned_steps"] for status, body in found if status == 200) >= 6
        with urllib.request.urlopen(serve.base_url + "/metrics") as response:
            metrics = response.read().decode()
        assert re.search(r'sinkguard:faults_total\{model_name="[^"]+",stage="layer"\} 6\.0', metrics), metrics
        assert serve.output().count("detector fault in layer") == 1  # logged once, with its cause
        assert "InjectedFault" in serve.output()
        serve.stop_with(signal.SIGTERM)
    finally:
        if serve.process.poll() is None:
            serve.process.kill()


def test_sigint_stops_every_process(hf_model, served_profile, tmp_path):
    serve = Serve(hf_model.source.path, served_profile[0], tmp_path)
    try:
        serve.wait_ready()
        status, body = http_json(serve.base_url + "/sinkguard/status")
        assert status == 200 and body["enabled"] and body["workers"][0]["persistent_buffer_bytes"] > 0
        serve.stop_with(signal.SIGINT)
    finally:
        if serve.process.poll() is None:
            serve.process.kill()


def test_serve_refuses_a_worker_running_without_the_detector(hf_model, served_profile, tmp_path):
    serve = Serve(hf_model.source.path, served_profile[0], tmp_path,
                  extra=["--worker-cls", "unobserved_worker.UnobservedWorker"],
                  env={"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])})
    tree: set[int] = set()
    deadline = time.time() + 600
    while serve.process.poll() is None and time.time() < deadline:
        tree |= descendants(serve.process.pid)
        time.sleep(1)
    assert serve.process.returncode == 2, serve.output()[-3000:]
    assert "1 of 1 workers run without the detector" in serve.output()
    time.sleep(2)
    assert not [p for p in tree if alive(p)] and port_free(serve.port)
