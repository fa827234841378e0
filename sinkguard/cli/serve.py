"""``sinkguard serve``: vLLM's OpenAI server with the plugin, calibrating the model on the fly if needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sinkguard.cli.options import ModelOption, console


def serve(
    ctx: typer.Context,
    model: ModelOption = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Sink profile folder (default: calibrate the model on the fly, cached).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="JSON ServeConfig (profile, store sizes, metrics).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to bind.")] = 8000,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The model's name in the API (default: the model's own name); arms are <name>:<arm>.")] = None,
    drain_timeout: Annotated[Optional[int], typer.Option("--drain-timeout", min=0, help="On SIGTERM / SIGINT / SIGHUP: seconds in-flight requests may take to finish (no new ones are accepted) before the rest are aborted; 0 aborts at once. Default 20, at most 3600.")] = None,
) -> None:
    """Start vLLM's OpenAI-compatible server with online sink detection.

    Arguments after the options go to vLLM unchanged (e.g. --max-model-len 2048,
    --tensor-parallel-size 2, --enforce-eager to debug in eager mode), except those sinkguard serve
    sets itself (--host, --port, --model, --served-model-name, --shutdown-timeout: use the options
    above), which are refused. vLLM runs in its default mode (compiled, prefix caching); sinkguard
    adds --no-async-scheduling, and piecewise CUDA graphs on GPU. After start-up every worker must
    report the detector installed, or the server is stopped. SIGTERM / SIGINT / SIGHUP drain and stop
    the whole server (a second signal or SIGQUIT stops it at once). Exit status: 0 stopped on request;
    1 the server ended on its own (e.g. its engine died) or had to be killed, with one line saying
    why; 2 refused (bad option or vLLM argument, port in use, worker without the detector).
    """
    from sinkguard.engines.vllm.launch import check_drain_timeout, check_port_free, check_vllm_args, prepare_launch
    from sinkguard.engines.vllm.server import serve_forever
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig, load_serve_config
    from sinkguard.sources.models import resolve_model

    check_vllm_args(list(ctx.args))  # all before minutes of calibration
    check_port_free(host, port)
    if drain_timeout is not None:
        check_drain_timeout(drain_timeout)
    resolved = resolve_model(model)
    settings = load_serve_config(config) if config is not None else None
    profile_path, _ = profile_for_model(resolved.path, profile or (settings.profile if settings else None))
    settings = (settings or ServeConfig(profile=str(profile_path))).model_copy(update={"profile": str(profile_path)})
    drain = {} if drain_timeout is None else {"drain_timeout": drain_timeout}  # default: prepare_launch's
    launch = prepare_launch(resolved.path, settings, served_model_name or resolved.name, host=host, port=port,
                            extra_args=list(ctx.args), **drain)
    console.print(f"serving {resolved.name} with sinkguard (profile {profile_path}) at {launch.base_url}")
    status = serve_forever(launch, on_ready=lambda: console.print(
        "ready (detector installed in every worker): POST /v1/completions, GET /sinkguard/requests/<response id>, "
        "GET /sinkguard/status, GET /metrics", soft_wrap=True))
    raise typer.Exit(status)
