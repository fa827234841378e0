"""Run sinkguard's ``register()`` in a process whose vLLM platform is simulated (a CUDA platform, or
one sinkguard does not support) and print, as one JSON line, what it imported and changed.

This CPU build of vLLM cannot import its GPU worker and runners under a CUDA platform (they load CUDA
kernels at import), so those three modules are stand-ins with classes of the same names; every
other module is vLLM's own. Every import of a ``vllm.v1.worker`` module is recorded, whether it
succeeds or not, so a CPU-only module that the plugin merely tried to import is caught too.

    python simulated_platform.py cuda|xpu [--import-cpu-worker]

``--import-cpu-worker`` is the control: it imports vLLM's CPU worker module that patches torch
before ``register()``, to show that the record sees it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import types

GPU_STANDINS = ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner", "vllm.v1.worker.gpu_worker")
WATCHED = "vllm.v1.worker"


class StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Records every ``vllm.v1.worker.*`` import and serves the GPU modules as stand-ins."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib's protocol
        if fullname.startswith(WATCHED + "."):
            self.requested.append(fullname)
        if fullname in GPU_STANDINS:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):  # noqa: ANN001
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        def load_model(self, *args, **kwargs):  # noqa: ANN001
            return None

        def compile_or_warm_up_model(self, *args, **kwargs):  # noqa: ANN001
            return None

        if module.__name__.endswith("gpu_worker"):
            module.Worker = type("Worker", (), {"load_model": load_model,
                                                "compile_or_warm_up_model": compile_or_warm_up_model,
                                                "__module__": module.__name__})
        else:
            module.GPUModelRunner = type("GPUModelRunner", (), {"load_model": load_model,
                                                                "__module__": module.__name__})


def _torch_state() -> dict:
    import torch

    return {"cuda.Event": torch.cuda.Event, "cuda.Stream": torch.cuda.Stream,
               "cuda.current_stream": torch.cuda.current_stream, "cuda.stream": torch.cuda.stream,
               "cuda.set_stream": torch.cuda.set_stream, "Tensor.pin_memory": torch.Tensor.pin_memory,
               "accelerator.synchronize": torch.accelerator.synchronize}


def main() -> None:
    kind = sys.argv[1]
    import vllm.platforms
    import vllm.utils.torch_utils  # noqa: F401 - vLLM's own stream-tracking patch, applied in every vLLM process
    from vllm.platforms.interface import Platform, PlatformEnum

    enum, device = {"cuda": (PlatformEnum.CUDA, "cuda"), "xpu": (PlatformEnum.XPU, "xpu")}[kind]
    platform_cls = type("Simulated", (Platform,), {"_enum": enum, "device_name": device, "device_type": device})
    vllm.platforms._current_platform = platform_cls()
    before = _torch_state()
    finder = StandIns()
    sys.meta_path.insert(0, finder)
    if "--import-cpu-worker" in sys.argv:
        importlib.import_module("vllm.v1.worker.cpu.shm")
    from sinkguard.engines.vllm import plugin

    result: dict = {"platform": plugin.platform_name()}
    try:
        plugin.register()
        result["error"] = None
    except Exception as exc:  # the refusal of an unsupported platform is the expected outcome there
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["requested"] = sorted(set(finder.requested))
    result["loaded_cpu_modules"] = sorted(m for m in sys.modules if m.startswith(WATCHED + ".cpu"))
    after = _torch_state()
    result["torch_replaced"] = sorted(name for name, value in before.items() if after[name] is not value)
    result["wrapped"] = sorted(
        f"{module}.{name}" for module in GPU_STANDINS if module in sys.modules
        for name in ("GPUModelRunner", "Worker") if hasattr(sys.modules[module], name)
        and getattr(getattr(sys.modules[module], name).load_model, "_sinkguard_wrapped", False))
    print("SIMULATED " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
