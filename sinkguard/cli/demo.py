"""The main job end to end on the embedded model (``sinkguard demo`` / ``make demo``).

1. pull the embedded model; 2. scan built-in prompts offline (report + figures);
3. calibrate a sink profile; 4. measure an intervention policy offline (secondary-sink attention
mass and perplexity without/with it); 5. serve the profile and two policies with vLLM + sinkguard,
send real requests that select a policy each, and print what the server detected and which
tokens each policy edited, per request and in its Prometheus metrics; 6. run a live A/B
experiment (none vs act) in that server: users assigned by weight, one log line per request, the
report with an always-valid test; 7. evaluate none vs act paired on the same items (perplexity,
MMLU, long-context retrieval) and write the HTML report.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# The demo's policies: ACT in the layers where the embedded model's secondary sinks live (3-9),
# and MLP projection removal at the forming layers. `sinkguard select-heads` calibrates which heads.
DEMO_POLICIES = {"default": "none", "policies": [
    {"name": "act", "interventions": [{"kind": "attention_redistribution", "beta": 0.0,
                                       "layers": [3, 4, 5, 6, 7, 8, 9]}]},
    {"name": "remove", "interventions": [{"kind": "mlp_projection_removal", "alpha": 1.0}]},
]}


def run_demo(out: Path, num_prompts: int, tokens: int, console: Console, serve: bool = True) -> None:
    from sinkguard.cli.terminal import print_profile_summary, print_scan_summary
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.offline.calibration import choose_detector, profile_from_scan
    from sinkguard.offline.figures import write_scan
    from sinkguard.offline.scanner import scan
    from sinkguard.sources.prompts import default_prompts

    steps = 7 if serve else 4
    console.rule(f"1/{steps} embedded model")
    model = HFSinkModel.load(None)
    console.print(f"{model.info.name} at {model.source.path}")
    console.rule(f"2/{steps} offline scan")
    prompts = default_prompts(lambda t: model.tokenize(t, add_bos=False), count=num_prompts, tokens=tokens)
    result = scan(model, prompts)
    written = write_scan(result, out / "scan")
    print_scan_summary(result, console)
    console.print("wrote " + ", ".join(str(p) for p in written))
    console.rule(f"3/{steps} sink profile")
    profile = profile_from_scan(*choose_detector(result))  # detector settings validated against attention
    profile.save(out / "profile")
    print_profile_summary(profile, console)
    console.rule(f"4/{steps} intervention policy 'act', offline (transformers)")
    (out / "policies.json").write_text(json.dumps(DEMO_POLICIES, indent=1))
    show_policy_effect(model, profile, prompts[:4], out / "policy_effect", console)
    if serve:
        console.rule(f"5/{steps} vLLM server with online detection and per-request policies")
        with demo_server(model, out / "profile", out / "policies.json", out / "serve", console) as server:
            query_policies(server, model, prompts, out / "serve", console)
            console.rule(f"6/{steps} live A/B in the same server: none vs act, sticky per user")
            live_ab(server, out / "serve", console)
            console.rule(f"7/{steps} paired evaluation: none vs act on the same items")
            paired_evaluation(server, model, out / "eval", console)


def show_policy_effect(model, profile, prompts, out: Path, console: Console) -> None:
    from sinkguard.core.settings import ScanConfig
    from sinkguard.interventions.policy import load_policies
    from sinkguard.offline.effects import policy_effect
    from sinkguard.offline.figures import policy_effect as effect_figure
    from sinkguard.offline.scanner import prompt_token_ids, scan

    policy = load_policies(out.parent / "policies.json").get("act")
    config = ScanConfig()
    before = scan(model, prompts, config, profile=profile, progress=False)
    after = scan(model, prompts, config, profile=profile, progress=False, policy=policy)
    effect = policy_effect(before, after, policy, model, profile,
                           held_out=[prompt_token_ids(model, p, config) for p in prompts])
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy_effect.json").write_text(json.dumps(effect.to_dict(), indent=1))
    table = Table(title=f"'act' on {effect.prompts} prompts: attention on the {effect.secondary_sinks} secondary "
                        "sinks the detector found without it", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("without", justify="right")
    table.add_column("with 'act'", justify="right")
    for layer, (b, a) in enumerate(zip(effect.mass_before, effect.mass_after)):
        if b is not None and a is not None and 2 <= layer <= 11:
            table.add_row(str(layer), f"{b:.3f}", f"{a:.3f}")
    console.print(table)
    console.print(f"still flagged by the detector: {effect.still_flagged}/{effect.secondary_sinks}; perplexity "
                  f"{effect.perplexity_before:.3f} -> {effect.perplexity_after:.3f} (reported as measured); "
                  f"figure {effect_figure(effect, out / 'policy_effect.png')}")


DEMO_AB = {"arms": {"none": 1, "act": 1}, "sticky": "user", "seed": 0}


@contextmanager
def demo_server(model, profile_path: Path, policies: Path, workdir: Path, console: Console) -> Iterator[Any]:
    """A sinkguard server for the demo's steps 5-7: the profile, the policies and a live A/B experiment."""
    from sinkguard.engines.vllm.launch import free_port, prepare_launch
    from sinkguard.engines.vllm.server import RunningServer
    from sinkguard.serving.settings import ABConfig, ServeConfig

    ab = ABConfig(**DEMO_AB, log=str(workdir / "ab.jsonl"))
    config = ServeConfig(profile=str(profile_path), policies=str(policies), ab=ab)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ab.jsonl").unlink(missing_ok=True)
    launch = prepare_launch(model.source.path, config, "smollm2",
                            port=free_port(), extra_args=["--max-model-len", "2048", "--dtype", "float32"],
                            workdir=workdir)
    console.print(f"starting vLLM at {launch.base_url} (log {workdir / 'server.log'}) ...")
    with RunningServer(launch) as server:
        server.wait_ready(timeout=600)
        yield server


def query_policies(server, model, prompts, workdir: Path, console: Console) -> None:
    from sinkguard.engines.vllm.server import http_json

    bos = model.tokenizer.bos_token_id
    requests = [[bos, *p.token_ids[:160]] for p in prompts[:8]]
    chosen = ["none", "act", "remove", "act", "none", "remove", "act", "none"]
    def send(job: tuple[list[int], str]) -> dict:
        ids, policy = job
        status, body = http_json(server.base_url + "/v1/completions", {
            "model": "smollm2", "prompt": ids, "max_tokens": 48, "temperature": 0.0,
            "vllm_xargs": {"sinkguard_policy": policy}})
        if status != 200:
            raise RuntimeError(f"request failed ({status}): {body}")
        return body

    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(send, zip(requests, chosen)))
    table = Table(title="online detection and interventions per request (4 in flight)", title_justify="left")
    for column in ("id", "policy", "tokens prefill/decode", "secondary sinks prefill/decode",
                   "strongest sink", "edits @ tokens acted on"):
        table.add_column(column)
    for body in bodies:
        status, found = http_json(server.base_url + f"/sinkguard/requests/{body['id']}")
        record = found["requests"][0]
        secondary = [e for e in record["events"] if e["kind"] == "secondary"]
        phases = [sum(e["phase"] == p for e in secondary) for p in ("prefill", "decode")]
        strongest = max(secondary, key=lambda e: e["mlp_norm_ratio"] or 0.0, default=None)
        table.add_row(body["id"][5:11] + "…", record["policy"],
                      f"{record['tokens_scanned']['prefill']}/{record['tokens_scanned']['decode']}",
                      f"{phases[0]}/{phases[1]}",
                      f"{strongest['token']!r}@{strongest['position']} L{strongest['birth_layer']}+"
                      f"{strongest['lifetime']} MLP{strongest['forming_layer']} "
                      f"x{strongest['mlp_norm_ratio']:.0f}" if strongest else "-",
                      describe_edits(record))
    console.print(table)
    console.print("strongest sink: token@position, birth layer+lifetime, forming MLP, MLP output / median token; "
                  "edits: token edits per intervention and the positions of the tokens acted on")
    with urllib.request.urlopen(server.base_url + "/metrics") as response:
        lines = [line for line in response.read().decode().splitlines()
                 if line.startswith("sinkguard:") and not line.startswith("sinkguard:ab_")
                 and re.search(r"_total|_count", line)]
    console.print("Prometheus (/metrics):\n  " + "\n  ".join(lines[:16]))
    (workdir / "responses.json").write_text(json.dumps(bodies, indent=1))


AB_QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "How do bees make honey?",
                "Why is the sky blue?", "What does a compiler do?", "Give me a synonym for happy."]


def live_ab(server, workdir: Path, console: Console, users: int = 24) -> None:
    """Traffic from ``users`` users (two chat turns each) that selects no arm: the server assigns
    one per user by weight; then the experiment's report from its log."""
    from sinkguard.engines.vllm.server import http_json
    from sinkguard.evaluation.ab_report import ab_report
    from sinkguard.evaluation.html_report import ab_report_html, write_html
    from sinkguard.evaluation.summary import print_ab_report
    from sinkguard.serving.ab import read_log

    jobs = [(f"user-{u}", AB_QUESTIONS[(u + turn) % len(AB_QUESTIONS)]) for u in range(users) for turn in range(2)]

    def send(job: tuple[str, str]) -> str:
        user, question = job
        status, body = http_json(server.base_url + "/v1/chat/completions", {
            "model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 32,
            "temperature": 0.0, "user": user})
        if status != 200:
            raise RuntimeError(f"request failed ({status}): {body}")
        return body["id"]

    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(send, jobs))
    log = workdir / "ab.jsonl"
    deadline = time.monotonic() + 30  # records are written just after their responses
    while True:
        rows = [r for r in (read_log(log) if log.exists() else []) if r["assignment"] != "explicit"]
        if len(rows) >= len(sent) or time.monotonic() > deadline:  # (step 5's requests chose their policy)
            break
        time.sleep(0.1)
    report = ab_report(rows, "none")
    print_ab_report(report, console)
    html = write_html(workdir / "ab_report.html", ab_report_html(report, rows, source=str(log)))
    console.print(f"{len(sent)} requests from {users} users; log {log} (one line per request); report {html}; "
                  f"any time: sinkguard ab report {log}")


def paired_evaluation(server, model, out: Path, console: Console) -> None:
    """none vs act through the server on the same items, compared paired; the HTML report."""
    from sinkguard.evaluation import build_tasks
    from sinkguard.evaluation.client import ArmClient
    from sinkguard.evaluation.outputs import save_evaluation
    from sinkguard.evaluation.runner import evaluate
    from sinkguard.evaluation.summary import print_comparison

    tokenizer = model.tokenizer
    tasks = build_tasks(["perplexity", "mmlu", "retrieval"], tokenizer, seed=0, perplexity_prompts=6,
                        perplexity_tokens=192, mmlu_items=40, retrieval_lengths=[512, 1024], retrieval_per_length=2)
    clients = {arm: ArmClient(server.base_url, "smollm2", arm) for arm in ("none", "act")}
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    config = {"server": server.base_url, "served_model": "smollm2", "arms": ["none", "act"],
              "tasks": [t.name for t in tasks], "seed": 0, "source": "sinkguard demo"}
    run = evaluate(clients, tasks, encode, "none", concurrency=8, config=config)
    comparison, paths = save_evaluation(run, out)
    print_comparison(comparison, console)
    console.print(f"report: {paths['report']}  (also {paths['markdown']}, {paths['run']})")


SHORT_NAMES = {"mlp_projection_removal": "removal", "mlp_norm_clamp": "clamp", "attention_redistribution": "ACT",
               "first_token_scaling": "ZeroTuning"}


def describe_edits(record: dict) -> str:
    if not record["interventions_applied"]:
        return "-"
    counts = ", ".join(f"{SHORT_NAMES.get(kind, kind)} x{n}" for kind, n in record["interventions_applied"].items())
    positions = sorted({e["position"] for e in record["interventions"]})
    shown = ", ".join(map(str, positions[:6])) + (" …" if len(positions) > 6 else "")
    return f"{counts}; @{shown}"
