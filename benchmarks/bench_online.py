"""Online detection overhead: sinkguard (observe only) vs plain vLLM, same settings, same run.

Configurations (engine start-up excluded from timings):

- ``ab``: one engine with the sinkguard plugin; every run measures it twice, with the detector's
  hooks installed and removed (``sinkguard_set_detection`` over ``collective_rpc``), in
  alternating order. Without hooks the engine runs exactly plain vLLM's code path, so the paired
  ratio is the detector's cost, free of the run-to-run drift of a shared 2-core machine
  (separate processes drifted by +-10% between runs here);
- ``plain-eager``: plain vLLM with the settings sinkguard requires (``enforce_eager``, no prefix
  cache), in its own process without the plugin;
- ``sinkguard``: the same plus the plugin, in its own process;
- ``plain-default``: vLLM's default mode (torch.compile, prefix caching), to show what the
  required settings cost by themselves.

All three run the float32 weights in float32 (vLLM's CPU default would be bf16).

Workloads (greedy, ``ignore_eos``): a batch of 32 prompts x 128 output tokens (throughput, output
tokens/s) and single-stream decode of one prompt (time per output token, from a 1-token and a
129-token generation). Each measured ``--runs`` times after a warm-up; medians reported.

    python benchmarks/bench_online.py --runs 5
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

CONFIGS = ("ab", "plain-eager", "sinkguard", "plain-default")


def prompts(count: int, length: int) -> list[list[int]]:
    from sinkguard.engines.hf.runner import HFSinkModel  # tokenizer only; the model load is cheap
    from sinkguard.prompts import default_prompts

    model = HFSinkModel.load(None)
    chunks = default_prompts(lambda t: model.tokenize(t, add_bos=False), count=count, tokens=length - 1)
    return [[model.tokenizer.bos_token_id, *c.token_ids] for c in chunks]


def child(config: str, runs: int, batch: int, output_tokens: int) -> dict:
    from sinkguard.models import ensure_embedded_model

    model_dir = str(ensure_embedded_model().path)
    batch_prompts = prompts(batch, 128)
    if config in ("sinkguard", "ab"):
        from sinkguard.calibrate import profile_for_model
        from sinkguard.config import ServeConfig

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
        print("| detector hooks (same engine, paired runs) | throughput (output tok/s) | single-stream TPOT (ms) |")
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
              f"{100 * (base['throughput'] / d['throughput'] - 1):+.1f}%, TPOT {100 * (base['tpot_ms'] / d['tpot_ms'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
