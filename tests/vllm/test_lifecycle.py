"""`sinkguard serve` as an operator runs it: it survives detector faults, drains on SIGTERM (stops
accepting, lets in-flight streams finish up to the drain timeout, ends the rest cleanly, logs every
A/B request once), stops completely (no orphaned vLLM process, port free), stops at once and says so
on a second signal, exits non-zero with a one-line reason when its engine dies, serves seeded
requests whose prompt is prefilled in chunks, and refuses to serve unobserved."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import TESTS

from sinkguard.engines.vllm.launch import free_port
from sinkguard.engines.vllm.server import http_json
from sinkguard.serving.ab import read_log
from sinkguard.serving.settings import ABConfig, FaultInjection, ServeConfig

pytestmark = pytest.mark.slow


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


def engine_core(pid: int) -> int:
    """The pid of vLLM's engine core process below ``pid`` (vLLM titles it ``VLLM::EngineCore``)."""
    for child in descendants(pid):
        try:
            if (Path("/proc") / str(child) / "cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                return child
        except OSError:
            continue
    raise AssertionError("no engine core process found")


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

    def reasons(self) -> list[str]:
        """sinkguard serve's own one-line reasons for how the server ended."""
        return [line for line in self.output().splitlines() if line.startswith("sinkguard serve:")]

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
        check that it exits 0 and that everything it started is gone and the port is free."""
        tree = descendants(self.process.pid)
        assert tree, "the server should be running"
        self.process.send_signal(signum)
        assert self.process.wait(timeout=90) == 0, self.output()[-3000:]
        self.assert_gone(tree)

    def assert_gone(self, tree: set[int]) -> None:
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in tree):
            time.sleep(0.5)
        assert not [p for p in tree if alive(p)], "orphaned server processes"
        assert port_free(self.port)


def completion(base_url: str, prompt: list[int], max_tokens: int = 16) -> tuple[int, dict]:
    return http_json(base_url + "/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": prompt,
                                                    "max_tokens": max_tokens, "temperature": 0.0})


def test_faults_are_served_unobserved_until_the_detector_removes_itself_then_sigterm(
        hf_model, served_profile, online_prompts, policy_file, tmp_path):
    config = ServeConfig(profile=str(served_profile[0]), fault_limit=6, policies=str(policy_file),
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
        assert worker["unscanned_steps"] >= 6  # every faulted step counts (as the docs say)
        # a request for a policy now gets none's output: the response says so instead of pretending
        request = urllib.request.Request(serve.base_url + "/v1/completions", headers={
            "Content-Type": "application/json"}, data=json.dumps({
                "model": "SmolLM2-135M-Instruct:remove", "prompt": online_prompts[0], "max_tokens": 2}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers["x-sinkguard-arm"] == "remove"
            assert response.headers["x-sinkguard-applied"] == "false"
            assert "removed after 6 detector faults" in response.headers["x-sinkguard-unapplied-reason"]
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


class Stream:
    """One streamed completion read as it arrives: its chunks, when it began and ended, how."""

    def __init__(self, port: int, body: dict) -> None:
        self.port, self.body = port, body
        self.started = threading.Event()  # the first chunk arrived
        self.events: list[dict] = []
        self.done = False  # ended with data: [DONE]
        self.error: str | None = None
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            connection.request("POST", "/v1/completions", json.dumps(self.body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200, response.read()
            for raw in response:  # line by line as the chunks arrive
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data:"):
                    self.events.append(json.loads(line[5:]))
                    self.started.set()
        except Exception as exc:  # an incomplete chunked read, a reset, a timeout
            self.error = repr(exc)
        finally:
            self.ended_at = time.time()
            self.started.set()

    @property
    def finish_reason(self) -> str | None:
        return next((e["choices"][0]["finish_reason"] for e in self.events if e["choices"][0].get("finish_reason")),
                    None)


def connection_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


DRAIN_S = 10


def test_sigterm_under_load_drains_streams_logs_each_request_once_and_stops(
        hf_model, served_profile, policy_file, tmp_path):
    """16 streams in flight, then SIGTERM: no new connection is accepted, the short streams finish,
    the long ones end cleanly (finish_reason abort, [DONE]) at the drain timeout, every request is in
    the A/B log once, and the whole server is gone. Before the drain, clients hung ~34 s until the
    SIGKILL fallback, got `incomplete chunked read`, and none of them reached the A/B log."""
    ab_log = tmp_path / "ab.jsonl"
    config = ServeConfig(profile=str(served_profile[0]), policies=str(policy_file),
                         ab=ABConfig(arms={"none": 1, "act": 1}, log=str(ab_log)))
    serve = Serve(hf_model.source.path, served_profile[0], tmp_path, config,
                  extra=["--enforce-eager", "--drain-timeout", str(DRAIN_S)])
    try:
        serve.wait_ready()
        tree = descendants(serve.process.pid)
        body = {"model": "SmolLM2-135M-Instruct", "temperature": 0.7, "stream": True, "ignore_eos": True}
        short = [Stream(serve.port, {**body, "prompt": f"Note {i}:", "max_tokens": 32, "user": f"s{i}"})
                 for i in range(8)]
        long = [Stream(serve.port, {**body, "prompt": f"Story {i}:", "max_tokens": 1000, "user": f"l{i}"})
                for i in range(8)]
        for stream in short + long:
            assert stream.started.wait(120) and stream.error is None, stream.error
        signalled = time.time()
        serve.process.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        while not connection_refused(serve.port):  # stops accepting at once
            assert time.time() < deadline, "new connections still accepted during the drain"
            time.sleep(0.2)
        for stream in short + long:
            stream.thread.join(DRAIN_S + 20)
        for stream in short:  # finished in full while the server drained
            assert stream.done and stream.error is None and stream.finish_reason == "length", stream.events[-1:]
        for stream in long:  # cut at the drain timeout, cleanly
            assert stream.done and stream.error is None and stream.finish_reason == "abort", (stream.error,
                                                                                              stream.events[-1:])
            assert DRAIN_S - 1 <= stream.ended_at - signalled <= DRAIN_S + 8
        assert serve.process.wait(timeout=DRAIN_S + 60) == 0, serve.output()[-3000:]
        serve.assert_gone(tree)
        ids = [stream.events[0]["id"] for stream in short + long]
        logged = [row["response_id"] for row in read_log(ab_log)]
        assert sorted(logged) == sorted(ids), (len(logged), len(ids))  # every request once, no other
        assert "sinkguard: draining: new connections refused, 16 requests in flight" in serve.output()
        assert "aborting the 8 requests still running" in serve.output()
        assert serve.reasons() == []
    finally:
        if serve.process.poll() is None:
            serve.process.kill()


def test_sigint_drains_and_a_second_sigint_stops_every_process_at_once(hf_model, served_profile, tmp_path):
    serve = Serve(hf_model.source.path, served_profile[0], tmp_path, extra=["--enforce-eager"])
    try:
        serve.wait_ready()
        status, body = http_json(serve.base_url + "/sinkguard/status")
        assert status == 200 and body["enabled"] and body["workers"][0]["persistent_buffer_bytes"] > 0
        tree = descendants(serve.process.pid)
        stream = Stream(serve.port, {"model": "SmolLM2-135M-Instruct", "prompt": "Once", "max_tokens": 1000,
                                     "ignore_eos": True, "stream": True})
        assert stream.started.wait(120) and stream.error is None
        serve.process.send_signal(signal.SIGINT)
        time.sleep(3)
        assert serve.process.poll() is None and stream.ended_at is None  # draining: the stream goes on
        serve.process.send_signal(signal.SIGINT)
        assert serve.process.wait(timeout=30) == 1, serve.output()[-3000:]
        assert serve.reasons() == ["sinkguard serve: stopped at once on SIGINT then SIGINT: killed every server "
                                   "process (SIGKILL); requests in flight were cut off"]
        serve.assert_gone(tree)
    finally:
        if serve.process.poll() is None:
            serve.process.kill()


def test_seeded_chunked_prefill_is_served_and_an_engine_death_exits_non_zero(
        hf_model, served_profile, online_prompts, tmp_path):
    """vLLM CPU 0.32 killed its engine on a seeded request prefilled in chunks ("CPU Generator does
    not use offset"), and `sinkguard serve` then exited 0 in silence. Now the request is served,
    reproducibly, and an engine that dies (here: killed, as the OOM killer would) makes `sinkguard
    serve` exit 1 with a one-line reason."""
    serve = Serve(hf_model.source.path, served_profile[0], tmp_path,
                  extra=["--enforce-eager", "--max-num-batched-tokens", "32"])
    try:
        serve.wait_ready()
        prompt = online_prompts[0]
        assert len(prompt) > 32  # prefilled in chunks of 32 tokens

        def seeded(seed: int | None, prompt: list[int] = prompt) -> tuple[int, str]:
            status, body = http_json(serve.base_url + "/v1/completions", {
                "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 12, "temperature": 1.0,
                "seed": seed})
            assert status == 200, body
            return body["choices"][0]["text"]

        first = seeded(3)
        assert seeded(3) == first  # same seed, same tokens (the repeat's prefix is cached: other chunks)
        assert seeded(4) != first
        other = online_prompts[1]
        with ThreadPoolExecutor(4) as pool:  # seeded and unseeded requests in one batch
            batch = list(pool.map(lambda seed: seeded(seed, other), [3, 3, None, 5]))
        assert batch[0] == batch[1] and seeded(3, other) == batch[0]
        status, _ = completion(serve.base_url, online_prompts[2])
        assert status == 200  # still serving

        tree = descendants(serve.process.pid)
        os.kill(engine_core(serve.process.pid), signal.SIGKILL)
        assert serve.process.wait(timeout=120) == 1, serve.output()[-3000:]
        reasons = serve.reasons()
        assert len(reasons) == 1 and reasons[0].startswith(
            "sinkguard serve: vLLM's server stopped on its own (exit status ") and \
            "engine core exited unexpectedly" in reasons[0], reasons
        serve.assert_gone(tree)
    finally:
        if serve.process.poll() is None:
            serve.process.kill()


def test_serve_refuses_a_worker_running_without_the_detector(hf_model, served_profile, tmp_path):
    serve = Serve(hf_model.source.path, served_profile[0], tmp_path,
                  extra=["--worker-cls", "harness.unobserved_worker.UnobservedWorker"],
                  env={"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})
    tree: set[int] = set()
    deadline = time.time() + 600
    while serve.process.poll() is None and time.time() < deadline:
        tree |= descendants(serve.process.pid)
        time.sleep(1)
    assert serve.process.returncode == 2, serve.output()[-3000:]
    assert "1 of 1 workers run without the detector" in serve.output()
    time.sleep(2)
    assert not [p for p in tree if alive(p)] and port_free(serve.port)
