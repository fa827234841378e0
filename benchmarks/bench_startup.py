"""Engine start-up cost of vLLM's default mode (torch.compile) with and without sinkguard.

Each configuration starts the OpenAI server (`sinkguard serve`'s launch; plain vLLM = the plugin
inert, ``enabled: false``) on the embedded model and measures the seconds until ``/health``
answers, then stops it. Configurations: eager (``--enforce-eager``), default mode with an empty
vLLM cache folder (a cold compile), and default mode again on that folder (vLLM's compile caches
warm: AOT artifact and Inductor kernels). Servers start one at a time; each configuration ``--runs``
times, in rotation, medians reported with the ratio sinkguard / plain.

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


def start_seconds(sinkguard: bool, mode: str, cache_root: Path, dtype: str) -> float:
    from sinkguard.calibration import profile_for_model
    from sinkguard.config import ServeConfig
    from sinkguard.engines.vllm.server import RunningServer, free_port, prepare_launch
    from sinkguard.models import resolve_model

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
        return time.perf_counter() - start


def main() -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/startup.json"))
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)
    seconds: dict[str, list[float]] = {}
    for run in range(args.runs):
        for sinkguard in (False, True):
            cache_root = Path(tempfile.mkdtemp(prefix="sinkguard-vllm-cache-"))  # cold, then warm on the same folder
            for mode in MODES:
                key = f"{'sinkguard' if sinkguard else 'plain'} {mode}"
                value = start_seconds(sinkguard, mode, cache_root, args.dtype)
                seconds.setdefault(key, []).append(value)
                console.print(f"run {run}: {key:<26} {value:6.1f} s")
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    lines = ["| mode | plain vLLM (s) | sinkguard (s) | sinkguard / plain |", "|---|---|---|---|"]
    for mode in MODES:
        plain, ours = medians[f"plain {mode}"], medians[f"sinkguard {mode}"]
        lines.append(f"| {mode} | {plain:.1f} | {ours:.1f} | {ours / plain:.2f} |")
    command = "python benchmarks/bench_startup.py " + shlex.join(sys.argv[1:])
    table = "\n".join(lines)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "dtype": args.dtype, "seconds": seconds, "medians": medians,
                                    "markdown": table}, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
