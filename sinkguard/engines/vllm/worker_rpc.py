"""The workers' control plane: methods the plugin adds to vLLM's worker base class, reached from the
API server (``endpoints.py``, ``middleware.py``, ``ab_traffic.py``) and from an offline ``LLM``
through ``collective_rpc``. Each finds the worker's :class:`~sinkguard.engines.vllm.runtime.VllmSinkRuntime`
on its model runner (none: the plugin did not install the detector there).
"""

from __future__ import annotations

from typing import Any

RUNTIME_ATTR = "_sinkguard_runtime"  # the model runner's attribute holding its runtime


def runtime_of(worker: Any) -> Any:
    """The runtime installed on ``worker``'s model runner, or None."""
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, RUNTIME_ATTR, None)


def sinkguard_lookup(self: Any, request_id: str, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Worker RPC: the sink records of the request(s) a client knows by this exact id, events paged."""
    runtime = runtime_of(self)
    return runtime.lookup(request_id, offset, limit) if runtime is not None and runtime.record else []


def sinkguard_summaries(self: Any, client_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Worker RPC: sink and intervention counts of a batch of requests (the A/B log's), by client id."""
    runtime = runtime_of(self)
    return runtime.summaries(client_ids) if runtime is not None and runtime.record else {}


def sinkguard_status(self: Any) -> dict[str, Any]:
    """Worker RPC: whether the detector is installed, and its counters."""
    runtime = runtime_of(self)
    if runtime is not None:
        return runtime.status()
    runner = getattr(self, "model_runner", None)
    return {"runtime": False, "enabled": False, "runner": f"{type(runner).__module__}.{type(runner).__name__}"}


def sinkguard_set_detection(self: Any, enabled: bool) -> bool:
    """Worker RPC: remove or reinstall the layer observers at run time (an A/B of the detector's own
    cost, or an operator's kill switch). Returns whether they are installed now."""
    runtime = runtime_of(self)
    if runtime is None:
        return False
    if enabled and not runtime.installed:
        runtime.install()
    elif not enabled and runtime.installed:
        runtime.remove()
    return runtime.installed


WORKER_RPCS = (sinkguard_lookup, sinkguard_summaries, sinkguard_status, sinkguard_set_detection)


def add_worker_rpcs(worker_base: type) -> None:
    """Add every RPC above to ``worker_base`` (vLLM's ``WorkerBase``) under its own name."""
    for method in WORKER_RPCS:
        setattr(worker_base, method.__name__, method)
