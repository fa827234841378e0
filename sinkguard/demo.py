"""The main job end to end on the embedded model (``sinkguard demo`` / ``make demo``).

1. pull the embedded model; 2. scan built-in prompts offline (report + figures);
3. calibrate a sink profile; 4. measure an intervention policy offline (secondary-sink attention
mass and perplexity without/with it); 5. serve the profile and two policies with vLLM + sinkguard,
send real requests that select a policy each, and print what the server detected and which
tokens each policy edited, per request and in its Prometheus metrics.
"""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    from sinkguard.calibration import choose_detector, profile_from_scan
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.prompts import default_prompts
    from sinkguard.scanner import scan
    from sinkguard.terminal import print_profile_summary, print_scan_summary

    steps = 5 if serve else 4
    console.rule(f"1/{steps} embedded model")
    model = HFSinkModel.load(None)
    console.print(f"{model.info.name} at {model.source.path}")
    console.rule(f"2/{steps} offline scan")
    prompts = default_prompts(lambda t: model.tokenize(t, add_bos=False), count=num_prompts, tokens=tokens)
    result = scan(model, prompts)
    written = result.save(out / "scan")
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
        serve_and_query(model, out / "profile", out / "policies.json", prompts, out / "serve", console)


def show_policy_effect(model, profile, prompts, out: Path, console: Console) -> None:
    from sinkguard.config import ScanConfig
    from sinkguard.effects import policy_effect
    from sinkguard.figures import policy_effect as effect_figure
    from sinkguard.policy import load_policies
    from sinkguard.scanner import prompt_token_ids, scan

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


def serve_and_query(model, profile_path: Path, policies: Path, prompts, workdir: Path, console: Console) -> None:
    from sinkguard.config import ServeConfig
    from sinkguard.engines.vllm.server import RunningServer, free_port, http_json, prepare_launch

    config = ServeConfig(profile=str(profile_path), policies=str(policies))
    launch = prepare_launch(model.source.path, config, "smollm2",
                            port=free_port(), extra_args=["--max-model-len", "2048", "--dtype", "float32"],
                            workdir=workdir)
    console.print(f"starting vLLM at {launch.base_url} (log {workdir / 'server.log'}) ...")
    bos = model.tokenizer.bos_token_id
    requests = [[bos, *p.token_ids[:160]] for p in prompts[:8]]
    chosen = ["none", "act", "remove", "act", "none", "remove", "act", "none"]
    with RunningServer(launch) as server:
        server.wait_ready(timeout=600)

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
                     if line.startswith("sinkguard:") and re.search(r"_total|_count", line)]
        console.print("Prometheus (/metrics):\n  " + "\n  ".join(lines[:16]))
        (workdir / "responses.json").write_text(json.dumps(bodies, indent=1))


SHORT_NAMES = {"mlp_projection_removal": "removal", "mlp_norm_clamp": "clamp", "attention_redistribution": "ACT",
               "first_token_scaling": "ZeroTuning"}


def describe_edits(record: dict) -> str:
    if not record["interventions_applied"]:
        return "-"
    counts = ", ".join(f"{SHORT_NAMES.get(kind, kind)} x{n}" for kind, n in record["interventions_applied"].items())
    positions = sorted({e["position"] for e in record["interventions"]})
    shown = ", ".join(map(str, positions[:6])) + (" …" if len(positions) > 6 else "")
    return f"{counts}; @{shown}"
