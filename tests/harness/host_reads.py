"""Counts the reads of device data by the host in sinkguard's hooks, per engine step.

A read is a call that, with the model on a GPU, makes the host wait for the device: a tensor's value
brought to Python (``item``, ``tolist``, ``bool``/``int``/``float``, ``numpy``), a copy to host memory
that is not ``non_blocking`` (``cpu``, ``to("cpu")``, ``copy_`` into a host tensor), a data-dependent
shape (``nonzero``, ``masked_select``, ``unique``, boolean indexing) and comparisons read on the
host (``equal``). Tensors in host memory are exempt: the runner's CPU staging buffers
(``CpuGpuBuffer.cpu``, ``*_cpu`` tensors) and sinkguard's own host buffers, found by their storage.

On a CPU machine every tensor is in host memory, so "device" here means any tensor that is not one
of those host buffers: what would live on the GPU there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

T = torch.Tensor
VALUE_READS = {T.item, T.tolist, T.numpy, T.__bool__, T.__int__, T.__float__, T.__index__, T.cpu, torch.equal,
               T.equal}
SHAPE_READS = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
               torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default,
               torch.ops.aten.unique_dim.default}


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def host_storages(*holders: Any) -> set[int]:
    """Storages of the host-memory tensors held by ``holders`` (vLLM's runner and input batch)."""
    found: set[int] = set()
    for holder in holders:
        for name, value in vars(holder).items():
            cpu = getattr(value, "cpu", None)
            if isinstance(cpu, torch.Tensor) and hasattr(value, "gpu"):  # vLLM's CpuGpuBuffer
                found.add(storage_of(cpu))
            elif isinstance(value, torch.Tensor) and "cpu" in name:
                found.add(storage_of(value))
    return found


class _FunctionReads(TorchFunctionMode):
    def __init__(self, counter: HostReads) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        counter = self.counter
        if func in VALUE_READS and args and isinstance(args[0], torch.Tensor) and not counter.on_host(args[0]):
            counter.count(getattr(func, "__name__", str(func)))
        elif func is T.to and args and isinstance(args[0], torch.Tensor) and not counter.on_host(args[0]) \
                and "cpu" in str(args[1:] + tuple(kwargs.values())) and not kwargs.get("non_blocking"):
            counter.count("to(cpu)")
        elif func is T.copy_ and counter.on_host(args[0]) and not counter.on_host(args[1]) \
                and not (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
            counter.count("copy_ to host")
        elif func is T.__getitem__ and _boolean_index(args[1]) and not counter.on_host(args[0]):
            counter.count("boolean index")
        return func(*args, **kwargs)


def _boolean_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class _ShapeReads(TorchDispatchMode):
    def __init__(self, counter: HostReads) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in SHAPE_READS and not self.counter.on_host(args[0]):
            self.counter.count(str(func))
        return func(*args, **(kwargs or {}))


class HostReads:
    """``with reads:`` counts host reads of device tensors into the current step's entry."""

    def __init__(self, host: set[int]) -> None:
        self.host = host
        self.steps: list[dict[str, Any]] = []  # per step: phase, tokens, requests, reads, what they were
        self.phase = ""  # the caller's name for the steps that follow

    def on_host(self, tensor: Any) -> bool:
        return not isinstance(tensor, torch.Tensor) or storage_of(tensor) in self.host

    def begin_step(self, tokens: int, requests: int) -> None:
        self.steps.append({"phase": self.phase, "tokens": tokens, "requests": requests, "reads": 0, "calls": {}})

    def count(self, what: str) -> None:
        if self.steps:
            step = self.steps[-1]
            step["reads"] += 1
            step["calls"][what] = step["calls"].get(what, 0) + 1

    def __enter__(self) -> HostReads:
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth == 1:  # a hook called from a hook is counted once
            self._modes = (_FunctionReads(self), _ShapeReads(self))
            for mode in self._modes:
                mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            for mode in reversed(self._modes):
                mode.__exit__(*exc)


def count_runtime_reads(runtime: Any, runner: Any) -> HostReads:
    """Count host reads in every hook the runtime runs on the host (not in the model's forward): step
    start and end, reading a pending step, the per-layer handler as the compiled layer op calls it,
    attention edits. (Eager per-layer wrappers bound ``_on_layer`` at install and are not counted;
    they only keep references or copy on the device.)"""
    host = host_storages(runner, runner.input_batch)
    staging = getattr(runtime, "_staging", None)
    if staging is not None:
        host.add(storage_of(staging.host))
    reads = HostReads(host)

    def counted(method: Any, starts_step: bool = False) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            if starts_step:
                batch = runner.input_batch
                reads.begin_step(int(runner.query_start_loc.np[batch.num_reqs]), int(batch.num_reqs))
            with reads:
                return method(*args, **kwargs)

        return run

    runtime._on_step_start = counted(runtime._on_step_start, starts_step=True)
    for name in ("_on_step_end", "_finish_pending", "_on_layer", "_attend"):
        setattr(runtime, name, counted(getattr(runtime, name)))
    return reads
