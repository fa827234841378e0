"""Engine start-up cost of vLLM's default mode (torch.compile) with and without sinkguard.

Each configuration starts the OpenAI server (`sinkguard serve`'s launch; plain vLLM = the plugin
inert, ``enabled: false``) on the embedded model and measures the seconds until ``/health``
answers, then stops it. Configurations: eager (``--enforce-eager``), default mode with an empty
vLLM cache folder (a cold compile), and default mode again on that folder (vLLM's compile caches
warm: AOT artifact and Inductor kernels). Servers start one at a time; each configuration ``--runs``
times, in rotation, medians reported with the ratio sinkguard / plain. Each start's log says what
vLLM did with its compile cache (``aot``: saved a fresh compile, loaded the artifact, or failed to
load it and compiled again: vLLM 0.32's CPU bug, worked around only when sinkguard is enabled, see
``sinkguard/engines/vllm/startup.py``) and how many per-weight dtype warnings it printed.

    python benchmarks/bench_startup.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODES = ("eager", "compiled-cold", "compiled-warm")


def cache_use(log: str) -> str:
    """What vLLM did with its AOT compile cache, from the server's log."""
    if "Compiling model again due to a load failure" in log:
        return "load failed, compiled"
    if "Directly load AOT compilation" in log:
        return "loaded"
    return "compiled" if "saved AOT compiled function" in log else "none"


def start_seconds(sinkguard: bool, mode: str, cache_root: Path, dtype: str) -> tuple[float, str, int]:
    """Seconds to ready, what the start did with the compile cache, per-weight dtype warnings logged."""
    from sinkguard.engines.vllm.launch import free_port, prepare_launch
    from sinkguard.engines.vllm.server import RunningServer
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig
    from sinkguard.sources.models import resolve_model

    model_dir = resolve_model(None).path
    profile_path, _ = profile_for_model(None)
    config = ServeConfig(profile=str(profile_path), enabled=sinkguard)
    workdir = Path(tempfile.mkdtemp(prefix="sinkguard-bench-startup-"))
    launch = prepare_launch(model_dir, config, "m", port=free_port(), workdir=workdir,
                            extra_args=["--max-model-len", "2048", "--dtype", dtype,
                                        *(["--enforce-eager"] if mode == "eager" else [])])
    launch.env["VLLM_CACHE_ROOT"] = str(cache_root)
    start = time.perf_counter()
    with RunningServer(launch) as server:
        server.wait_ready(timeout=1800)
        seconds = time.perf_counter() - start
    log = server.log_path.read_text(errors="replace")
    return seconds, cache_use(log), log.count("Attempted to load weight")


def main() -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/startup.json"))
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)
    seconds: dict[str, list[float]] = {}
    caches: dict[str, list[str]] = {}
    warnings: dict[str, list[int]] = {}
    for run in range(args.runs):
        for sinkguard in (False, True):
            cache_root = Path(tempfile.mkdtemp(prefix="sinkguard-vllm-cache-"))  # cold, then warm on the same folder
            for mode in MODES:
                key = f"{'sinkguard' if sinkguard else 'plain'} {mode}"
                value, cache, dtype_warnings = start_seconds(sinkguard, mode, cache_root, args.dtype)
                seconds.setdefault(key, []).append(value)
                caches.setdefault(key, []).append(cache)
                warnings.setdefault(key, []).append(dtype_warnings)
                console.print(f"run {run}: {key:<26} {value:6.1f} s  compile cache: {cache:<22} "
                              f"dtype warnings: {dtype_warnings}")
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    lines = ["| mode | plain vLLM (s) | sinkguard (s) | sinkguard / plain | compile cache (plain / sinkguard) |",
             "|---|---|---|---|---|"]
    for mode in MODES:
        plain, ours = medians[f"plain {mode}"], medians[f"sinkguard {mode}"]
        uses = " / ".join(", ".join(sorted(set(caches[f"{side} {mode}"]))) for side in ("plain", "sinkguard"))
        lines.append(f"| {mode} | {plain:.1f} | {ours:.1f} | {ours / plain:.2f} | {uses} |")
    command = "python benchmarks/bench_startup.py " + shlex.join(sys.argv[1:])
    table = "\n".join(lines)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "dtype": args.dtype, "seconds": seconds, "medians": medians,
                                    "compile_cache": caches, "dtype_warnings": warnings, "markdown": table},
                                   indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
