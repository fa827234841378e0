"""The main job end to end on the embedded model (``sinkguard demo`` / ``make demo``).

1. pull the embedded model; 2. scan built-in prompts offline (report + figures);
3. calibrate a sink profile; 4. serve it with vLLM + sinkguard and send real requests;
5. print what the server detected, per request and in its Prometheus metrics.
"""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_demo(out: Path, num_prompts: int, tokens: int, console: Console, serve: bool = True) -> None:
    from sinkguard.calibration import choose_detector, profile_from_scan
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.prompts import default_prompts
    from sinkguard.scanner import scan
    from sinkguard.terminal import print_profile_summary, print_scan_summary

    steps = 4 if serve else 3
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
    if serve:
        console.rule(f"4/{steps} vLLM server with online detection")
        serve_and_query(model, out / "profile", prompts, out / "serve", console)


def serve_and_query(model, profile_path: Path, prompts, workdir: Path, console: Console) -> None:
    from sinkguard.config import ServeConfig
    from sinkguard.engines.vllm.server import RunningServer, free_port, http_json, prepare_launch

    launch = prepare_launch(model.source.path, ServeConfig(profile=str(profile_path)), "smollm2",
                            port=free_port(), extra_args=["--max-model-len", "2048", "--dtype", "float32"],
                            workdir=workdir)
    console.print(f"starting vLLM at {launch.base_url} (log {workdir / 'server.log'}) ...")
    bos = model.tokenizer.bos_token_id
    requests = [[bos, *p.token_ids[:160]] for p in prompts[:8]]
    with RunningServer(launch) as server:
        server.wait_ready(timeout=600)

        def send(ids: list[int]) -> dict:
            status, body = http_json(server.base_url + "/v1/completions", {
                "model": "smollm2", "prompt": ids, "max_tokens": 48, "temperature": 0.0})
            if status != 200:
                raise RuntimeError(f"request failed ({status}): {body}")
            return body

        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(send, requests))
        table = Table(title="online detection per request (4 in flight)", title_justify="left")
        for column in ("response id", "tokens prefill/decode", "secondary sinks prefill/decode", "strongest sink"):
            table.add_column(column)
        for body in bodies:
            status, found = http_json(server.base_url + f"/sinkguard/requests/{body['id']}")
            record = found["requests"][0]
            secondary = [e for e in record["events"] if e["kind"] == "secondary"]
            phases = [sum(e["phase"] == p for e in secondary) for p in ("prefill", "decode")]
            strongest = max(secondary, key=lambda e: e["mlp_norm_ratio"] or 0.0, default=None)
            table.add_row(body["id"][:13] + "…",
                          f"{record['tokens_scanned']['prefill']}/{record['tokens_scanned']['decode']}",
                          f"{phases[0]}/{phases[1]}",
                          f"{strongest['token']!r}@{strongest['position']} L{strongest['birth_layer']}+"
                          f"{strongest['lifetime']} MLP{strongest['forming_layer']} "
                          f"x{strongest['mlp_norm_ratio']:.0f}" if strongest else "-")
        console.print(table)
        console.print("strongest sink: token@position, birth layer+lifetime, forming MLP, MLP output / median token")
        with urllib.request.urlopen(server.base_url + "/metrics") as response:
            lines = [line for line in response.read().decode().splitlines()
                     if line.startswith("sinkguard:") and re.search(r"_total|_count", line)]
        console.print("Prometheus (/metrics):\n  " + "\n  ".join(lines[:12]))
        (workdir / "responses.json").write_text(json.dumps(bodies, indent=1))
