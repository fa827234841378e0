"""Online detection overhead: sinkguard (observe only) vs plain vLLM, same settings, same run.

Configurations (engine start-up excluded from timings):

- ``steps`` (the headline number): one in-process engine with the plugin, driven one engine step
  at a time (``LLMEngine.step``); the detector's layer observers are installed and removed between steps
  (on, off, off, on, ...) so every decode step is paired with its neighbour, which does the same
  work one token later. Removed observers = plain vLLM's code path. On a shared 2-core VM whose
  speed drifts by +-10% over seconds, only pairs this close resolve a 1-3% difference. Reports
  the median paired ratio of decode steps with a bootstrap 95% interval, the prefill step's ratio
  (each workload's prefill step is paired with a prefill-only run just before it, in the other
  state), and the throughput ratio they imply for the workload;
- ``steps-served``: the same per-step pairing inside a multiprocess engine (the engine core in
  its own process, as ``sinkguard serve`` runs it): a function sent to the worker over
  ``collective_rpc`` wraps the model runner's ``execute_model`` to toggle the observers and time
  every step there. Decode steps only;
- ``ab``: the same engine (multiprocess, as served), observers toggled between whole workloads in
  alternating order (``sinkguard_set_detection`` over ``collective_rpc``);
- ``plain-eager``: plain vLLM with the settings sinkguard requires (``enforce_eager``, no prefix
  cache), in its own process without the plugin;
- ``sinkguard``: the same plus the plugin, in its own process;
- ``plain-default``: vLLM's default mode (torch.compile, prefix caching), to show what the
  required settings cost by themselves.

All run the float32 weights in float32 (vLLM's CPU default would be bf16).

Workloads (greedy, ``ignore_eos``): a batch of 32 prompts x 128 output tokens (throughput, output
tokens/s) and single-stream decode of one prompt (time per output token). Each measured
``--runs`` times after a warm-up; medians reported.

    python benchmarks/bench_online.py --configs steps --runs 6
    python benchmarks/bench_online.py --runs 5 --configs plain-eager sinkguard plain-default
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = ("steps", "steps-served", "ab", "plain-eager", "sinkguard", "plain-default")


def prompts(count: int, length: int) -> list[list[int]]:
    from sinkguard.engines.hf.runner import HFSinkModel  # tokenizer only; the model load is cheap
    from sinkguard.sources.prompts import default_prompts

    model = HFSinkModel.load(None)
    chunks = default_prompts(lambda t: model.tokenize(t, add_bos=False), count=count, tokens=length - 1)
    return [[model.tokenizer.bos_token_id, *c.token_ids] for c in chunks]


def child(config: str, runs: int, batch: int, output_tokens: int) -> dict:
    from sinkguard.sources.models import ensure_embedded_model

    model_dir = str(ensure_embedded_model().path)
    batch_prompts = prompts(batch, 128)
    if config == "steps":  # drive the engine core in this process, one step at a time
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if config == "steps-served":  # a benchmark function travels to the worker process
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if config in ("sinkguard", "ab", "steps", "steps-served"):
        from sinkguard.offline.calibration import profile_for_model
        from sinkguard.serving.settings import ServeConfig

        profile_path, _ = profile_for_model(None)
        path = os.path.join(tempfile.mkdtemp(), "serve.json")
        with open(path, "w") as handle:
            handle.write(ServeConfig(profile=str(profile_path), metrics=False).model_dump_json())
        os.environ["SINKGUARD_CONFIG"] = path
    else:
        os.environ.pop("SINKGUARD_CONFIG", None)
    from vllm import LLM, SamplingParams

    kwargs = {"max_model_len": 2048, "seed": 0, "dtype": "float32"}
    if config != "plain-default":
        kwargs.update(enforce_eager=True, enable_prefix_caching=False)
    llm = LLM(model=model_dir, **kwargs)

    def generate(items: list[list[int]], tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in items], params, use_tqdm=False)
        return time.perf_counter() - start

    def measure(run: int) -> tuple[float, float]:
        elapsed = generate(batch_prompts, output_tokens)
        single = [batch_prompts[run % batch]]
        first = generate(single, 1)
        full = generate(single, output_tokens + 1)
        return batch * output_tokens / elapsed, (full - first) / output_tokens

    generate(batch_prompts[:4], 8)  # warm-up
    if config == "steps":
        return {"config": config, **stepped_pairs(llm, batch_prompts, runs, output_tokens)}
    if config == "steps-served":
        out = {}
        for workload, items in (("batch", batch_prompts), ("single", batch_prompts[:1])):
            llm.collective_rpc(time_worker_steps)
            for _ in range(2 * runs):
                generate(items, output_tokens)
            out[workload] = llm.collective_rpc(collect_worker_steps)[0]
        return {"config": config, **out}
    if config == "ab":
        results: dict[bool, dict[str, list[float]]] = {s: {"throughput": [], "tpot": []} for s in (True, False)}
        for run in range(runs):
            for state in ((True, False) if run % 2 == 0 else (False, True)):
                assert llm.collective_rpc("sinkguard_set_detection", args=(state,)) == [state]
                throughput, tpot = measure(run)
                results[state]["throughput"].append(throughput)
                results[state]["tpot"].append(tpot)
        return {"config": config, "on": results[True], "off": results[False]}
    throughput, tpot = [], []
    for run in range(runs):
        t, p = measure(run)
        throughput.append(t)
        tpot.append(p)
    return {"config": config, "throughput": throughput, "tpot": tpot}


def observers_on(step: int) -> bool:
    """The on, off, off, on, ... pattern: steps (0, 1), (2, 3), ... form on/off pairs, and neither
    state always goes first."""
    return step % 4 in (0, 3)


def paired_ratios(timed: list[tuple[bool, float]]) -> list[float]:
    """on/off time ratios of consecutive (state, seconds) pairs laid out by :func:`observers_on`."""
    return [a / b if on_a else b / a for (on_a, a), (on_b, b) in zip(timed[0::2], timed[1::2]) if on_a != on_b]


def stepped_pairs(llm, batch_prompts: list[list[int]], runs: int, output_tokens: int) -> dict:
    """Per-step paired timings with the detector's observers toggled between engine steps."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    installed = None

    def set_detection(on: bool) -> None:
        nonlocal installed
        if installed != on:
            assert llm.collective_rpc("sinkguard_set_detection", args=(on,)) == [on]
            installed = on

    def status() -> dict:
        return llm.collective_rpc("sinkguard_status")[0]

    def run(name: str, items: list[list[int]], prefill_on: bool,
            tokens: int = output_tokens) -> list[tuple[bool, float]]:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        for i, prompt in enumerate(items):
            engine.add_request(f"{name}-{i}", {"prompt_token_ids": prompt}, params)
        times, step = [], 0
        while engine.has_unfinished_requests():
            # step 0 is the prefill (the whole batch fits one step), then the decode steps
            on = prefill_on if step == 0 else observers_on(step - 1)
            set_detection(on)
            start = time.perf_counter()
            engine.step()
            times.append((on, time.perf_counter() - start))
            step += 1
        return times

    out = {}
    for workload, items in (("batch", batch_prompts), ("single", batch_prompts[:1])):
        decode_pairs, prefill, decode_off = [], {True: [], False: []}, []
        before = status()
        for r in range(2 * runs):
            # The prefill step is paired with a prefill-only run just before it, in the other state.
            prefill_on = r % 2 == 0
            (_, alone), = run(f"{workload}-{r}-prefill", items, prefill_on=not prefill_on, tokens=1)
            times = run(f"{workload}-{r}", items, prefill_on=prefill_on)
            prefill[prefill_on].append(times[0][1])
            prefill[not prefill_on].append(alone)
            decode = times[1:]
            decode_pairs += paired_ratios(decode)
            decode_off += [seconds for on, seconds in decode if not on]
        after = status()
        out[workload] = {
            "decode_pairs": decode_pairs,
            "decode_off_median_s": statistics.median(decode_off),
            "decode_steps_per_run": len(times) - 1,
            "prefill_on": prefill[True], "prefill_off": prefill[False],
            "detector_ms_per_step": 1e3 * (after["detector_seconds"] - before["detector_seconds"])
            / max(1, after["steps"] - before["steps"]),
            "zero_copy_capture": after["zero_copy_capture"], "unscanned_steps": after["unscanned_steps"],
        }
    set_detection(True)
    return out


def time_worker_steps(worker) -> None:
    """Runs in the worker process: time every ``execute_model`` call, toggling the observers in an
    on, off, off, on, ... pattern (benchmark only)."""
    runner = worker.model_runner
    runtime = runner._sinkguard_runtime
    original = getattr(runner, "_bench_original_execute", None) or runner.execute_model
    log: list[tuple[bool, float, int]] = []  # (observers on, seconds, tokens in the step)
    counter = [0]

    def timed(scheduler_output, *args, **kwargs):
        on = observers_on(counter[0])
        counter[0] += 1
        if on != runtime.installed:
            runtime.install() if on else runtime.remove()
        start = time.perf_counter()
        output = original(scheduler_output, *args, **kwargs)
        log.append((on, time.perf_counter() - start, scheduler_output.total_num_scheduled_tokens))
        return output

    runner._bench_original_execute = original
    runner._bench_log = log
    runner.execute_model = timed


def collect_worker_steps(worker) -> dict:
    """Runs in the worker process: paired decode-step ratios, and the original runner back."""
    runner = worker.model_runner
    runner.execute_model = runner._bench_original_execute
    runner._sinkguard_runtime.install()
    log = runner._bench_log
    # Pairs of decode steps only: both steps of a pair carry the same, small number of tokens.
    aligned = [entry for a, b in zip(log[0::2], log[1::2]) if a[2] == b[2] <= 256 for entry in (a, b)]
    return {"decode_pairs": paired_ratios([(on, seconds) for on, seconds, _ in aligned]), "steps": len(log)}


def bootstrap_median(values: list[float], draws: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    medians = np.median(data[rng.integers(0, data.size, (draws, data.size))], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def report_steps(data: dict, batch: int, output_tokens: int) -> None:
    print("| workload | paired decode steps | decode step on/off (median, 95% CI) | prefill on/off | "
          "workload time on/off | detector ms/step |")
    print("|---|---|---|---|---|---|")
    for workload in ("batch", "single"):
        w = data[workload]
        pairs = w["decode_pairs"]
        decode_ratio = statistics.median(pairs)
        low, high = bootstrap_median(pairs)
        prefill_ratio = statistics.median(a / b for a, b in zip(w["prefill_on"], w["prefill_off"]))
        prefill_off = statistics.median(w["prefill_off"])
        decode_off = w["decode_off_median_s"] * w["decode_steps_per_run"]
        # The workload's time with detection on, from its parts' ratios (prefill + decode steps).
        total_ratio = (prefill_off * prefill_ratio + decode_off * decode_ratio) / (prefill_off + decode_off)
        label = f"{batch} x {output_tokens} (throughput)" if workload == "batch" else "single stream (TPOT)"
        print(f"| {label} | {len(pairs)} | {decode_ratio:.4f} ({low:.4f}-{high:.4f}) | {prefill_ratio:.4f} | "
              f"{total_ratio:.4f} | {w['detector_ms_per_step']:.2f} |")
        if workload == "batch":
            print(f"\nthroughput {100 * (1 / total_ratio - 1):+.1f}%", end="; ", file=sys.stderr)
        else:
            print(f"TPOT {100 * (decode_ratio - 1):+.1f}% (zero-copy capture: {w['zero_copy_capture']}, "
                  f"unscanned steps: {w['unscanned_steps']})", file=sys.stderr)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.runs, args.batch, args.output_tokens)))
        return
    results = {}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    for config in args.configs:
        proc = subprocess.run([sys.executable, __file__, "--child", config, "--runs", str(args.runs),
                               "--batch", str(args.batch), "--output-tokens", str(args.output_tokens)],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{config} failed: {proc.stderr[-2000:]}", file=sys.stderr)
            continue
        data = json.loads(line[len("RESULT "):])
        if config == "steps":
            report_steps(data, args.batch, args.output_tokens)
            continue
        if config == "steps-served":
            for workload in ("batch", "single"):
                pairs = data[workload]["decode_pairs"]
                low, high = bootstrap_median(pairs)
                print(f"steps-served {workload}: {len(pairs)} paired decode steps, on/off median "
                      f"{statistics.median(pairs):.4f} (95% CI {low:.4f}-{high:.4f})")
            continue
        if config == "ab":
            on, off = data["on"], data["off"]
            thr = [a / b for a, b in zip(on["throughput"], off["throughput"])]
            tpot = [a / b for a, b in zip(on["tpot"], off["tpot"])]
            results["ab"] = {"throughput_ratio": statistics.median(thr), "tpot_ratio": statistics.median(tpot),
                             "on": on, "off": off}
            print(f"ab: paired throughput ratios {[round(x, 3) for x in thr]}, TPOT ratios "
                  f"{[round(x, 3) for x in tpot]}", file=sys.stderr)
            continue
        results[config] = {"throughput": statistics.median(data["throughput"]),
                           "tpot_ms": 1000 * statistics.median(data["tpot"]), "raw": data}
        print(f"{config}: {results[config]['throughput']:.1f} tok/s, TPOT {results[config]['tpot_ms']:.2f} ms "
              f"(runs: {[round(x, 1) for x in data['throughput']]})", file=sys.stderr)
    ab = results.pop("ab", None)
    if ab:
        print("| detector observers (same engine, paired runs) | throughput (output tok/s) | single-stream TPOT (ms) |")
        print("|---|---|---|")
        for state in ("off", "on"):
            print(f"| {state} | {statistics.median(ab[state]['throughput']):.1f} | "
                  f"{1000 * statistics.median(ab[state]['tpot']):.2f} |")
        print(f"\npaired medians, on / off: throughput {100 * (ab['throughput_ratio'] - 1):+.1f}%, "
              f"TPOT {100 * (ab['tpot_ratio'] - 1):+.1f}%\n")
    print(f"| configuration | throughput (output tok/s, {args.batch} x {args.output_tokens}) | "
          "single-stream TPOT (ms) |")
    print("|---|---|---|")
    for config, r in results.items():
        print(f"| {config} | {r['throughput']:.1f} | {r['tpot_ms']:.2f} |")
    base = results.get("plain-eager")
    if base and "sinkguard" in results:
        s = results["sinkguard"]
        print(f"\nsinkguard vs plain-eager: throughput {100 * (s['throughput'] / base['throughput'] - 1):+.1f}%, "
              f"TPOT {100 * (s['tpot_ms'] / base['tpot_ms'] - 1):+.1f}%")
    if base and "plain-default" in results:
        d = results["plain-default"]
        print(f"plain-eager vs plain-default (cost of the required settings): throughput "
              f"{100 * (base['throughput'] / d['throughput'] - 1):+.1f}%, "
              f"TPOT {100 * (base['tpot_ms'] / d['tpot_ms'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
