"""vLLM's OpenAI API server as ``sinkguard serve`` runs it: vLLM's own ``main``, with a bounded drain.

``sinkguard serve`` starts ``python -m sinkguard.engines.vllm.api_server <vLLM arguments>`` (the
arguments are vLLM's). On SIGTERM or SIGINT vLLM 0.32's API server stops its engine client first
(``engine_client.shutdown(timeout=--shutdown-timeout)``) and its HTTP server only afterwards, with
no time limit: streams whose requests the engine dropped wait for output that never comes, until
someone kills the process, and their A/B records are never written. Before that engine shutdown runs
(it runs in a worker thread), this module drains the HTTP side on the event loop:

1. stop accepting: close the listening sockets (new connections are refused, so a load balancer
   moves on) and ask every open connection to close after its current response, as uvicorn's own
   graceful shutdown does;
2. wait until every in-flight HTTP request has finished, for at most ``--shutdown-timeout`` seconds
   (``sinkguard serve --drain-timeout``) counted from the signal;
3. then abort what the engine still runs: each such stream ends cleanly (``finish_reason:
   "abort"``, ``data: [DONE]``), and each response is complete;
4. wait (briefly) for sinkguard's own background work on the loop, such as writing the A/B log;
5. hand over to vLLM's shutdown, which now finds an idle engine. uvicorn's final wait for open
   requests is bounded too (:data:`HTTP_SHUTDOWN_S`), in case a request outlived the abort.

The patch applies only in this process (the engine core and workers vLLM spawns re-import this
module under another name and run nothing of it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm.sinkguard")  # vLLM's log format and level, beside its own shutdown lines

ABORT_GRACE_S = 5.0  # after the abort, for the aborted streams to end and the rest to settle
HTTP_SHUTDOWN_S = 5.0  # uvicorn's own final wait for open requests (vLLM leaves it unbounded)
POLL_S = 0.05
_PACKAGE = str(Path(__file__).resolve().parents[2]) + os.sep  # sinkguard's own coroutines live under here


@dataclass
class Serving:
    """The running HTTP server, as the drain needs it."""

    server: Any  # vLLM's uvicorn server
    loop: asyncio.AbstractEventLoop
    thread: int  # the loop's thread
    drained: bool = False


_SERVING: list[Serving] = []


def stop_accepting(server: Any) -> None:
    """No new connections; open ones close after their current response (uvicorn's first steps)."""
    for listener in getattr(server, "servers", None) or []:
        listener.close()
    for connection in list(server.server_state.connections):
        connection.shutdown()


async def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll ``done()`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


def sinkguard_tasks() -> list[asyncio.Task]:
    """Pending tasks running sinkguard's own coroutines (the A/B log writer), other than this one."""
    current = asyncio.current_task()
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if task is not current and not task.done() and code is not None and code.co_filename.startswith(_PACKAGE):
            found.append(task)
    return found


async def drain(server: Any, engine: Any, timeout: float) -> None:
    """Steps 1-4 of the module docstring."""
    started = time.monotonic()
    tasks = server.server_state.tasks
    stop_accepting(server)
    logger.info("[shutdown] sinkguard: draining: new connections refused, %d requests in flight, up to %ss",
                len(tasks), timeout)
    if not await wait_until(lambda: not tasks, timeout):
        running = list(engine.output_processor.request_states)
        logger.warning("[shutdown] sinkguard: drain timeout (%ss): aborting the %d requests still running",
                       timeout, len(running))
        await engine.abort(running, internal=True)
        if not await wait_until(lambda: not tasks, ABORT_GRACE_S):
            logger.warning("[shutdown] sinkguard: %d requests still open after the abort", len(tasks))
    await wait_until(lambda: not sinkguard_tasks(), ABORT_GRACE_S)
    logger.info("[shutdown] sinkguard: drained in %.1fs", time.monotonic() - started)


def _record_server(startup: Callable) -> Callable:
    @functools.wraps(startup)
    async def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.config.timeout_graceful_shutdown is None:
            self.config.timeout_graceful_shutdown = HTTP_SHUTDOWN_S
        _SERVING.append(Serving(self, asyncio.get_running_loop(), threading.get_ident()))
        return await startup(self, *args, **kwargs)

    return recorded


def _drain_first(shutdown: Callable) -> Callable:
    @functools.wraps(shutdown)
    def draining(self: Any, timeout: float | None = None) -> Any:
        serving = _SERVING[0] if _SERVING else None
        # vLLM's signal path calls this from a worker thread; its other paths (engine death, start-up
        # failure) call it on the loop, where waiting for the loop would deadlock: no drain there.
        if serving is not None and not serving.drained and threading.get_ident() != serving.thread:
            serving.drained = True
            try:
                asyncio.run_coroutine_threadsafe(drain(serving.server, self, float(timeout or 0)),
                                                 serving.loop).result()
            except Exception:  # stopping must go on
                logger.exception("[shutdown] sinkguard: drain failed")
        return shutdown(self, timeout=timeout)

    return draining


def install() -> None:
    """Patch vLLM's uvicorn server class (remember the running server) and ``AsyncLLM.shutdown``."""
    from vllm.entrypoints.launchers import launcher
    from vllm.v1.engine.async_llm import AsyncLLM

    launcher.NoSignalServer.startup = _record_server(launcher.NoSignalServer.startup)
    AsyncLLM.shutdown = _drain_first(AsyncLLM.shutdown)


def main() -> None:
    install()
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
