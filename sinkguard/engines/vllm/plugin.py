"""``vllm.general_plugins`` entry point: loaded by vLLM in every process (API server, engine
core, workers).

Inert unless ``$SINKGUARD_CONFIG`` names a :class:`~sinkguard.config.ServeConfig` JSON file: a
multi-tenant server that merely has sinkguard installed is unchanged. When enabled it

1. validates the config in every process, so a bad field fails server start-up naming it;
2. wraps the model runners' ``load_model`` so that, right after the weights load, each worker
   checks the engine settings and the profile against the loaded weights and installs
   :class:`~sinkguard.engines.vllm.runtime.VllmSinkRuntime`;
3. adds the control-plane methods ``sinkguard_lookup`` / ``sinkguard_status`` /
   ``sinkguard_set_detection`` to vLLM's worker base class, reached through ``collective_rpc``
   (see ``routes.py``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from sinkguard.config import ServeConfig, load_serve_config
from sinkguard.errors import ConfigError

logger = logging.getLogger("sinkguard")

CONFIG_ENV = "SINKGUARD_CONFIG"
_RUNTIME_ATTR = "_sinkguard_runtime"


def enabled_config() -> ServeConfig | None:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return None
    config = load_serve_config(path)
    return config if config.enabled else None


TRUSTED_STATUSES = ("validated", "no_secondary_sinks")


def check_profile_trust(profile: Any, config: ServeConfig) -> None:
    """Refuse a profile whose detector was not shown to agree with attention, unless allowed."""
    status = profile.validation_status
    if status in TRUSTED_STATUSES or config.allow_unvalidated_detector:
        return
    message = profile.meta.validation.get("message", "")
    raise ConfigError(
        f"sink profile {config.profile} has detector status '{status}' ({message}). Its flags may be ordinary tokens: "
        "recalibrate with attention on and more prompts (`sinkguard calibrate`), or set allow_unvalidated_detector: "
        "true in the sinkguard serve config to serve it anyway."
    )


def install_runtime(runner: Any, config: ServeConfig) -> Any:
    """Check the engine and the profile, then wrap ``runner.model``'s decoder layers with the detector."""
    from sinkguard.engines.vllm.runtime import VllmSinkRuntime, check_engine_settings, vllm_model_info
    from sinkguard.profile import SinkProfile

    vllm_config = runner.vllm_config
    check_engine_settings(vllm_config)
    if not (hasattr(runner, "input_batch") and hasattr(runner, "requests")):
        raise ConfigError(f"sinkguard supports vLLM's v1 model runner, not {type(runner).__name__}: "
                          "unset VLLM_USE_V2_MODEL_RUNNER")
    profile = SinkProfile.load(config.profile)
    check_profile_trust(profile, config)
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
    except Exception:  # not initialised (single process tests)
        rank = 0
    info = vllm_model_info(runner.model, vllm_config.model_config.hf_config, profile.model.name,
                           sample_projections=rank == 0)  # other ranks hold other projection slices
    profile.check_model(info)
    runtime = VllmSinkRuntime(runner, config, profile, record=rank == 0)
    runtime.install()
    setattr(runner, _RUNTIME_ATTR, runtime)
    logger.info("sinkguard: detector installed (profile %s, window layers %s)", config.profile,
                profile.meta.window_layers)
    return runtime


def _wrap_load_model(runner_cls: type, config: ServeConfig) -> None:
    original = runner_cls.load_model
    if getattr(original, "_sinkguard_wrapped", False):
        return

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if getattr(self, _RUNTIME_ATTR, None) is None:  # a subclass may call super().load_model
            install_runtime(self, config)
        return result

    load_model._sinkguard_wrapped = True  # type: ignore[attr-defined]
    runner_cls.load_model = load_model


def _runtime_of(worker: Any) -> Any:
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, _RUNTIME_ATTR, None)


def sinkguard_lookup(self: Any, request_id: str) -> list[dict[str, Any]]:
    """Worker RPC: the sink records of the request(s) with this id (or id prefix)."""
    runtime = _runtime_of(self)
    return runtime.lookup(request_id) if runtime is not None and runtime.record else []


def sinkguard_status(self: Any) -> dict[str, Any]:
    """Worker RPC: whether the detector is installed, and its counters."""
    runtime = _runtime_of(self)
    return runtime.status() if runtime is not None else {"enabled": False}


def sinkguard_set_detection(self: Any, enabled: bool) -> bool:
    """Worker RPC: remove or reinstall the layer observers at run time (an A/B of the detector's own
    cost, or an operator's kill switch). Returns whether they are installed now."""
    runtime = _runtime_of(self)
    if runtime is None:
        return False
    if enabled and not runtime.installed:
        runtime.install()
    elif not enabled and runtime.installed:
        runtime.remove()
    return runtime.installed


def register() -> None:
    """The entry point. Idempotent (vLLM may call it more than once per process)."""
    config = enabled_config()  # raises ConfigError (naming the field) on a bad config
    if config is None:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    _wrap_load_model(GPUModelRunner, config)
    try:  # the CPU runner overrides load_model
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _wrap_load_model(CPUModelRunner, config)
    except ImportError:
        pass
    WorkerBase.sinkguard_lookup = sinkguard_lookup  # type: ignore[attr-defined]
    WorkerBase.sinkguard_status = sinkguard_status  # type: ignore[attr-defined]
    WorkerBase.sinkguard_set_detection = sinkguard_set_detection  # type: ignore[attr-defined]
