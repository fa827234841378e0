"""Running and supervising vLLM's OpenAI-compatible server with sinkguard enabled (``sinkguard serve``);
the command and environment come from :mod:`sinkguard.engines.vllm.launch`.

:class:`RunningServer` owns the server's whole process group (API server, engine core, workers):
stopping it asks vLLM's API server to drain and stop, waits until no process of the group is left,
and kills what remains after the drain timeout and a margin. The server is started with a
parent-death signal, so it goes down with its parent even when that parent is killed outright.
:func:`serve_forever` (``sinkguard serve``) checks the port, relays vLLM's output, asks every worker
after start-up whether the detector is installed, turns SIGTERM / SIGINT / SIGHUP into that drain
(a second signal, or SIGQUIT, stops at once), and says in one line why the server ended when nobody
asked it to, with a non-zero exit status.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import IO, Any

from sinkguard.engines.vllm.launch import ServerLaunch, check_port_free
from sinkguard.errors import ConfigError, ServerError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
DRAINING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a first one drains; SIGQUIT does not
STOP_MARGIN_S = 30.0  # after the drain: aborted streams end, engine and workers tear down


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


RECENT_LINES = 400  # of the server's output, kept to say why it ended
# a vLLM log line: "(EngineCore pid=12) ERROR 12-06 03:30:16 [core.py:1512] RuntimeError: ..."
_LOG_LINE = re.compile(r"^\((?P<process>[A-Za-z_]+)[^)]*\)\s+(?P<level>[A-Z]+)\s+\S+\s+\S+\s+"
                       r"\[[^\]]*\]\s?(?P<message>.*)$")
_EXCEPTION = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception|Exit|Interrupt|Fault)\b.*")


def death_cause(lines: list[str]) -> str | None:
    """The cause in a vLLM log that ends with a dead engine: the engine core's last logged exception,
    else vLLM's note that a process exited unexpectedly (the engine was killed: no traceback), else
    any process's last logged exception (None: none found)."""
    engine: list[str] = []
    died: list[str] = []
    other: list[str] = []
    for line in lines:
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        message = match["message"].strip()
        if "unexpectedly" in message:
            died.append(message)
        elif match["level"] in ("ERROR", "CRITICAL") and _EXCEPTION.match(message):
            (engine if match["process"].startswith("EngineCore") else other).append(message)
    found = engine or died or other
    return found[-1][:300] if found else None


def _relay(source: IO[bytes], target: IO[str], recent: deque[str]) -> None:
    """Copy the server's output line by line to this process's ``target``, keeping recent lines."""
    for raw in iter(source.readline, b""):
        line = raw.decode(errors="replace")
        recent.append(line.rstrip("\n"))
        try:
            target.write(line)
            target.flush()
        except (OSError, ValueError):  # our own output is gone: keep reading so the server never blocks
            pass
    source.close()


class RunningServer:
    """A started server process group; a context manager that stops all of it."""

    def __init__(self, launch: ServerLaunch, log_path: Path | None = None, console: bool = False) -> None:
        """The server's output goes to ``log_path`` (default ``server.log`` in the launch folder), or
        with ``console`` through this process's own stdout/stderr (a service's journal)."""
        self.launch = launch
        self.log_path = None if console else (log_path or launch.workdir / "server.log")
        self._log = open(self.log_path, "wb") if self.log_path is not None else None
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        # Its own session: a terminal's Ctrl-C reaches the parent only, which forwards it once.
        self.process = subprocess.Popen(launch.command, env=launch.env,
                                        stdout=self._log or subprocess.PIPE,
                                        stderr=subprocess.STDOUT if self._log else subprocess.PIPE,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        self.pgid = self.process.pid
        self._relays = [] if self._log else [
            threading.Thread(target=_relay, args=(pipe, target, self.recent), daemon=True)
            for pipe, target in ((self.process.stdout, sys.stdout), (self.process.stderr, sys.stderr))]
        for relay in self._relays:
            relay.start()

    @property
    def base_url(self) -> str:
        return self.launch.base_url

    @property
    def stop_grace(self) -> float:
        """How long a stop may take before what is left is killed: the drain, then the teardown."""
        return self.launch.drain_timeout + STOP_MARGIN_S

    def ready(self) -> bool:
        """Whether ``/health`` answers 200; ServerError (with the log) if the server has exited."""
        if self.process.poll() is not None:
            raise ServerError(f"the vLLM server exited with status {self.process.returncode} before it was ready"
                              f"{self._cause_suffix()}:\n{self.log_tail()}")
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

    def death_cause(self) -> str | None:
        """Why the server ended, from its recent output (see :func:`death_cause`)."""
        if self._log is not None:
            return death_cause(self.log_tail(200_000).splitlines())
        for relay in self._relays:  # the output up to the exit
            relay.join(timeout=5)
        return death_cause(list(self.recent))

    def _cause_suffix(self) -> str:
        cause = self.death_cause() if self._log is None else None
        return f" ({cause})" if cause else ""

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the server."""
        if _group_alive(self.pgid):
            os.killpg(self.pgid, signum)

    def stopped(self) -> bool:
        return self.process.poll() is not None and not _group_alive(self.pgid)

    def wait_stopped(self, deadline: float, give_up: Any = None) -> bool:
        """Wait until no process of the group is left (True), ``deadline`` (time.time()) passes or
        ``give_up()`` is true (False). Once vLLM's API server is gone, what it left gets 10 s more."""
        while not self.stopped():
            if time.time() >= deadline or (give_up is not None and give_up()):
                return False
            if self.process.poll() is not None:
                deadline = min(deadline, time.time() + 10.0)
            time.sleep(0.2)
        return True

    def kill(self) -> None:
        """SIGKILL every process of the group and wait until they are gone."""
        self.send_signal(signal.SIGKILL)
        self.process.wait()
        deadline = time.time() + 10
        while _group_alive(self.pgid) and time.time() < deadline:
            time.sleep(0.1)

    def stop(self, signum: int = signal.SIGTERM, grace: float | None = None) -> bool:
        """Ask vLLM's API server to drain and stop (``signum`` to it alone: it stops its engine and
        workers itself), wait until no process of the group is left, and SIGKILL what remains after
        ``grace`` seconds (default :attr:`stop_grace`). Returns whether anything had to be killed."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        killed = not self.wait_stopped(time.time() + (self.stop_grace if grace is None else grace))
        if killed:
            self.kill()
        self.close()
        return killed

    def close(self) -> None:
        for relay in self._relays:
            relay.join(timeout=5)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bearer_headers(extra_args: list[str] | None = None) -> dict[str, str]:
    """Authorization for sinkguard's admin routes: the admin token, else the server's API key."""
    from sinkguard.engines.vllm.access import ADMIN_TOKEN_ENV

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


def _report(message: str) -> None:
    print(f"sinkguard serve: {message}", file=sys.stderr, flush=True)


def serve_forever(launch: ServerLaunch, on_ready: Any = None, ready_timeout: float = 900.0) -> int:
    """Run the server until it ends; the exit status of ``sinkguard serve``.

    0: it stopped because this process got SIGTERM, SIGINT or SIGHUP, and drained in time. 1: it
    ended on its own (its engine died, vLLM exited) or had to be killed (a second signal, SIGQUIT, or
    no exit within the drain timeout and :data:`STOP_MARGIN_S`); one line on stderr says which and
    why. ConfigError (status 2) for an occupied port or a worker without the detector; ServerError
    (status 2) when vLLM exits during start-up. This process returns only once no process of the
    server is left (no orphaned engine holding memory and the port)."""
    check_port_free(launch.host, launch.port)
    server = RunningServer(launch, console=True)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        if len(received) == 1 and signum in DRAINING_SIGNALS and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)  # vLLM's API server drains on SIGTERM (api_server.py)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        if server.wait_ready(ready_timeout, stop_waiting=lambda: bool(received)):
            check_detector_installed(launch.base_url, bearer_headers(launch.command))
            if on_ready is not None:
                on_ready()
        while not received and server.process.poll() is None:
            time.sleep(0.5)
        if not received:
            cause = server.death_cause()
            _report(f"vLLM's server stopped on its own (exit status {server.process.returncode}) although nobody "
                    f"asked it to stop{f'; its log: {cause}' if cause else ''}")
            return 1
        return _finish_stop(server, received)
    finally:
        if not server.stopped():
            server.stop()
        server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _finish_stop(server: RunningServer, received: list[int]) -> int:
    """After the first signal: wait for the drain and the exit (0), or kill on a second signal, on
    SIGQUIT, or when the server outlives the drain timeout and the margin (1, said on stderr)."""
    draining = received[0] in DRAINING_SIGNALS
    if draining and server.wait_stopped(time.time() + server.stop_grace, give_up=lambda: len(received) > 1):
        return 0
    if server.stopped():
        return 0
    names = " then ".join(signal.Signals(signum).name for signum in received[:2])
    if len(received) > 1 or not draining:
        _report(f"stopped at once on {names}: killed every server process (SIGKILL); requests in flight were cut off")
    else:
        _report(f"the server did not stop within {server.stop_grace:.0f}s of {names} (drain timeout "
                f"{server.launch.drain_timeout}s); killed its remaining processes (SIGKILL)")
    server.kill()
    return 1


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
