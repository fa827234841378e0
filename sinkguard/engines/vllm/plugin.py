"""``vllm.general_plugins`` entry point: loaded by vLLM in every process (API server, engine
core, workers).

Inert unless ``$SINKGUARD_CONFIG`` names a :class:`~sinkguard.serving.settings.ServeConfig` JSON file: a
multi-tenant server that merely has sinkguard installed is unchanged. When enabled it

1. validates the config in every process (:mod:`sinkguard.serving.loader`), so a bad field fails
   server start-up naming it;
2. wraps the model runners' ``load_model``: before the weights load, each worker refuses engine
   settings under which records would be wrong (``refusals.py``); right after, it checks the
   profile against the loaded weights and installs
   :class:`~sinkguard.engines.vllm.runtime.VllmSinkRuntime`. vLLM 0.32's V2 runners (GPU and
   CPU) are wrapped only to refuse (the check names what to set);
3. wraps the workers' ``load_model`` with a post-condition: a worker whose runner loaded a model
   without the detector being installed (a runner class nobody wrapped, e.g. from an out-of-tree
   platform) fails start-up naming the class, instead of serving unobserved. A worker class that
   overrides ``load_model`` itself escapes both wrappers; ``sinkguard serve`` therefore also asks
   every worker after start-up and stops the server unless all report the detector installed;
4. adds the control-plane methods of ``worker_rpc.py`` (``sinkguard_lookup``, ``sinkguard_status``,
   ``sinkguard_set_detection``, ...) to vLLM's worker base class, reached through ``collective_rpc``
   (see ``endpoints.py``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from sinkguard.engines.vllm.worker_rpc import RUNTIME_ATTR, add_worker_rpcs, runtime_of
from sinkguard.errors import ConfigError
from sinkguard.serving.loader import check_profile_trust, enabled_config, serve_policies
from sinkguard.serving.settings import ServeConfig

logger = logging.getLogger("sinkguard")


def install_runtime(runner: Any, config: ServeConfig) -> Any:
    """Check the engine and the profile, then wrap ``runner.model``'s decoder layers with the detector."""
    from sinkguard.core.profile import SinkProfile
    from sinkguard.engines.vllm.placement import python_in_model
    from sinkguard.engines.vllm.refusals import check_engine_settings
    from sinkguard.engines.vllm.runtime import VllmSinkRuntime, vllm_model_info
    from sinkguard.interventions.policy import ModelScope, check_scope

    vllm_config = runner.vllm_config
    policies = serve_policies(config)
    check_engine_settings(vllm_config, python_in_model(policies))
    if not (hasattr(runner, "input_batch") and hasattr(runner, "requests")):
        raise ConfigError(f"sinkguard observes vLLM's V1 model runner, not {type(runner).__module__}."
                          f"{type(runner).__name__}: set VLLM_USE_V2_MODEL_RUNNER=0")
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
    try:
        check_scope(policies.policies, ModelScope.from_profile(profile), policies.budget)
    except ConfigError as exc:
        raise ConfigError(f"policies ({config.policies}): {exc}") from None
    runtime = VllmSinkRuntime(runner, config, profile, record=rank == 0, policies=policies)
    if runtime.compiled:  # before the model's first forward, where vLLM compiles
        mark_compiled_graph(vllm_config, runtime.placement)
    runtime.install()
    setattr(runner, RUNTIME_ATTR, runtime)
    logger.info("sinkguard: detector installed (profile %s, window layers %s)", config.profile,
                profile.meta.window_layers)
    return runtime


def mark_compiled_graph(vllm_config: Any, placement: str) -> None:
    """Make vLLM's compile caches (Inductor and AOT artifacts) tell a graph with sinkguard's ops from one
    without, and one placement (``placement.py``) from the other: both key on ``VllmConfig.compute_hash``,
    which covers ``additional_config``. Set in the
    worker before the model's first forward, where vLLM compiles. Without it a plain server's cached
    graph could be loaded here and run the model unobserved (caught after warm-up, ``_wrap_worker``).
    Also lets vLLM 0.32 load its AOT artifact on CPU at all (``startup.allow_aot_reload``): without it
    every start compiles again."""
    from sinkguard._version import __version__
    from sinkguard.engines.vllm.layer_op import QUALIFIED_NAME
    from sinkguard.engines.vllm.startup import allow_aot_reload

    allow_aot_reload()  # vLLM loads the AOT artifact at the model's first forward, after this

    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    if not isinstance(vllm_config.additional_config, dict):
        raise ConfigError("sinkguard: vLLM's additional_config is not a dict on this platform, so a compiled graph "
                          "with sinkguard's op cannot be told apart in the compile cache; run with --enforce-eager")
    vllm_config.additional_config["sinkguard"] = f"{__version__}:{QUALIFIED_NAME}:{placement}"


def _wrap_runner(runner_cls: type, config: ServeConfig, observe: bool) -> None:
    """Check the settings before ``runner_cls.load_model`` and, if ``observe``, install the
    detector after it (a runner sinkguard cannot observe is only checked: the check refuses it)."""
    original = runner_cls.__dict__.get("load_model")
    if original is None or getattr(original, "_sinkguard_wrapped", False):
        return
    from sinkguard.engines.vllm.placement import python_in_model
    from sinkguard.engines.vllm.refusals import check_engine_settings

    in_model = python_in_model(serve_policies(config))

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_engine_settings(self.vllm_config, in_model)  # before minutes of weight loading
        result = original(self, *args, **kwargs)
        if observe and getattr(self, RUNTIME_ATTR, None) is None:  # a subclass may call super().load_model
            install_runtime(self, config)
        return result

    load_model._sinkguard_wrapped = True  # type: ignore[attr-defined]
    runner_cls.load_model = load_model


def _check_runner_observed(worker: Any) -> None:
    runner = getattr(worker, "model_runner", None)
    if getattr(runner, RUNTIME_ATTR, None) is None:
        raise ConfigError(
            f"sinkguard: the worker's model runner {type(runner).__module__}.{type(runner).__name__} loaded the "
            "model without sinkguard's detector (a runner class sinkguard does not wrap), so requests would be "
            "served unobserved. Use vLLM's V1 runner (VLLM_USE_V2_MODEL_RUNNER=0) or disable sinkguard (unset "
            "SINKGUARD_CONFIG).")


def _check_op_called(worker: Any) -> None:
    runtime = runtime_of(worker)
    if runtime is not None and runtime.compiled and runtime.layer_calls == 0:
        raise ConfigError(
            "sinkguard: the compiled model ran its warm-up without calling sinkguard's layer op, so requests "
            "would be served unobserved (a compiled graph from a cache that does not know the op?). Clear "
            "vLLM's torch_compile_cache or set VLLM_DISABLE_COMPILE_CACHE=1, or run with --enforce-eager.")


def _add_postcondition(cls: type, method: str, check: Any) -> None:
    """Run ``check(self)`` after ``cls.<method>`` where ``cls`` defines it (idempotent)."""
    original = cls.__dict__.get(method)
    if original is None or getattr(original, "_sinkguard_wrapped", False):
        return

    @functools.wraps(original)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        check(self)
        return result

    checked._sinkguard_wrapped = True  # type: ignore[attr-defined]
    setattr(cls, method, checked)


def _wrap_worker(worker_cls: type) -> None:
    """Post-conditions on ``worker_cls.load_model`` (the runner it loaded carries the detector) and
    ``compile_or_warm_up_model`` (a compiled model calls sinkguard's op)."""
    _add_postcondition(worker_cls, "load_model", _check_runner_observed)
    _add_postcondition(worker_cls, "compile_or_warm_up_model", _check_op_called)


@dataclass(frozen=True)
class PlatformClasses:
    """The classes of one vLLM platform that sinkguard wraps. Only the running platform's are imported:
    importing another platform's worker can change the process (vLLM 0.32's CPU worker replaces
    ``torch.cuda.Event``, ``Stream``, ``current_stream``, ``Tensor.pin_memory`` and the memory queries
    process-wide when imported, which on a GPU worker sizes the KV cache from host RAM and breaks
    CUDA-graph capture and the sampled-token sync)."""

    runners: tuple[tuple[str, str, bool], ...]
    """(module, class, observed) of every runner class that defines ``load_model``. V1 runners are
    observed; V2 runners only checked (the check refuses them by name)."""
    workers: tuple[tuple[str, str], ...]
    """(module, class) of the workers whose ``load_model`` / ``compile_or_warm_up_model`` get post-conditions."""


_GPU_RUNNERS = (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", True),
                ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", False))
PLATFORM_CLASSES = {
    # CUDA: vLLM 0.32's GPU worker and runners (verified against the source; see docs/serving.md)
    "cuda": PlatformClasses(_GPU_RUNNERS, (("vllm.v1.worker.gpu_worker", "Worker"),)),
    # CPU: the CPU runners subclass the GPU ones; the CPU worker inherits Worker's load_model and has its
    # own compile_or_warm_up_model
    "cpu": PlatformClasses(
        (*_GPU_RUNNERS, ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", True),
         ("vllm.v1.worker.cpu.model_runner", "CPUModelRunner", False)),
        (("vllm.v1.worker.gpu_worker", "Worker"), ("vllm.v1.worker.cpu_worker", "CPUWorker"))),
}


def platform_name() -> str:
    """The platform vLLM runs on in this process, as a key of :data:`PLATFORM_CLASSES` (or not)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    return str(getattr(current_platform, "device_type", None) or type(current_platform).__name__)


def platform_classes(name: str) -> PlatformClasses:
    """ConfigError for a platform sinkguard has not been verified on (it refuses rather than guess)."""
    try:
        return PLATFORM_CLASSES[name]
    except KeyError:
        raise ConfigError(f"sinkguard supports vLLM's {' and '.join(sorted(PLATFORM_CLASSES))} platforms; this process "
                          f"runs on {name!r}, whose workers and runners it has not been checked against. Disable "
                          "sinkguard (unset SINKGUARD_CONFIG) on this platform.") from None


def _import_class(module: str, name: str) -> type | None:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:  # e.g. a platform build without that runner
        return None


def register() -> None:
    """The entry point. Idempotent (vLLM may call it more than once per process)."""
    config = enabled_config()  # raises ConfigError (naming the field) on a bad config
    if config is None:
        return
    from vllm.v1.worker.worker_base import WorkerBase

    from sinkguard.engines.vllm import cpu_seed
    from sinkguard.engines.vllm.cache_salt import wrap_input_processor
    from sinkguard.engines.vllm.startup import quiet_downcast_warnings

    platform = platform_name()
    classes = platform_classes(platform)  # before anything is imported or wrapped
    if platform == "cpu":
        cpu_seed.install()  # vLLM CPU 0.32 kills the engine on a seeded request prefilled in chunks
    wrap_input_processor(serve_policies(config))  # policies never share prefix-cached KV
    quiet_downcast_warnings()  # float32 model folders served in bfloat16: one line, not a warning per weight
    for module, name, observed in classes.runners:
        if (runner_cls := _import_class(module, name)) is not None:
            _wrap_runner(runner_cls, config, observed)
    for module, name in classes.workers:
        if (worker_cls := _import_class(module, name)) is not None:
            _wrap_worker(worker_cls)
    add_worker_rpcs(WorkerBase)
