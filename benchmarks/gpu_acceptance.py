"""The request side of ``benchmarks/gpu_acceptance.sh`` (see there; never run on a GPU so far).

    python benchmarks/gpu_acceptance.py prepare WORKDIR   # profile, policies, server configs
    python benchmarks/gpu_acceptance.py check WORKDIR     # against the servers the script started

Ports: 8001/8002 plain vLLM / sinkguard in float32 with the same settings, 8003/8004 the same in
bfloat16, 8005 plain vLLM in its own defaults (bfloat16), 8006 sinkguard on FLASHINFER with MLP
policies only. Prints one line per check and writes ``acceptance.json``; exit status 1 if a check fails.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import requests

ADMIN = {"Authorization": "Bearer acceptance-admin"}
POLICIES = {"default": "none", "policies": [
    {"name": "remove", "interventions": [{"kind": "mlp_projection_removal", "alpha": 1.0}]},
    {"name": "act", "interventions": [{"kind": "attention_redistribution", "beta": 0.2,
                                       "layers": [3, 4, 5, 6, 7, 8, 12, 20], "heads": [0, 4, 8]}]},
    {"name": "zero", "interventions": [{"kind": "first_token_scaling", "gamma": 0.5, "layers": [2, 5, 9],
                                        "heads": [1, 2]}]}]}
MLP_POLICIES = {"default": "none", "policies": POLICIES["policies"][:1]}
LOGPROB_TOLERANCE = 2e-3  # float32 vLLM on GPU vs float32 transformers on CPU
THROUGHPUT_TARGET = 0.97


def prepare(work: Path) -> None:
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig

    profile = str(profile_for_model(None)[0])
    for name, policies in (("sg-policies", POLICIES), ("sg-mlp", MLP_POLICIES)):
        (work / f"{name}-file.json").write_text(json.dumps(policies))
        config = ServeConfig(profile=profile, policies=str(work / f"{name}-file.json"), metrics=True)
        (work / f"{name}.json").write_text(config.model_dump_json())


class Server:
    def __init__(self, port: int) -> None:
        self.url = f"http://localhost:{port}"
        self.model = requests.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]

    def generate(self, prompt: list[int], max_tokens: int, policy: str | None = None,
                 **extra: Any) -> tuple[str, list[int], list[float]]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
                "return_tokens_as_token_ids": True, **extra}
        if policy is not None:
            body["vllm_xargs"] = {"sinkguard_policy": policy}
        response = requests.post(f"{self.url}/v1/completions", json=body, timeout=300)
        response.raise_for_status()
        choice = response.json()
        logprobs = choice["choices"][0]["logprobs"]
        return choice["id"], [int(t.split(":")[1]) for t in logprobs["tokens"]], logprobs["token_logprobs"]

    def status(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/sinkguard/status", headers=ADMIN, timeout=30).json()["workers"][0]

    def record(self, request_id: str) -> dict[str, Any]:
        return requests.get(f"{self.url}/sinkguard/requests/{request_id}", headers=ADMIN, timeout=30
                            ).json()["requests"][0]


def transformers_reference(hf: Any, profile: Any, policy: Any, prompt: list[int], steps: int
                           ) -> tuple[list[int], list[float]]:
    import torch

    from sinkguard.engines.hf.interventions import intervening

    tokens, logprobs = [], []
    with intervening(hf, policy, len(prompt), profile), torch.no_grad():
        out = hf.model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            scores = torch.log_softmax(out.logits[0, -1].double(), -1)
            token = int(scores.argmax())
            tokens.append(token)
            logprobs.append(float(scores[token]))
            out = hf.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


def throughput(server: Server, prompts: list[list[int]], requests_: int = 256, concurrency: int = 64) -> float:
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(len(r[1]) for r in pool.map(
            lambda i: server.generate(prompts[i % len(prompts)][:64], 128, ignore_eos=True), range(requests_)))
    return tokens / (time.perf_counter() - start)


def check(work: Path) -> int:
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.interventions.policy import PolicySet
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.sources.prompts import default_prompts

    hf = HFSinkModel.load(None)
    profile = profile_for_model(None)[1]
    policies = PolicySet.model_validate(POLICIES)
    bos = hf.tokenizer.bos_token_id
    prompts = [[bos, *p.token_ids] for p in default_prompts(lambda t: hf.tokenize(t, add_bos=False), count=32,
                                                            tokens=96)]
    results: dict[str, Any] = {}
    failures: list[str] = []

    def verdict(name: str, ok: bool, detail: Any) -> None:
        results[name] = {"ok": ok, "detail": detail}
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    for plain_port, ours_port, dtype in ((8001, 8002, "float32"), (8003, 8004, "bfloat16")):
        plain, ours = Server(plain_port), Server(ours_port)
        same = sum(plain.generate(p, 32)[1] == ours.generate(p, 32)[1] for p in prompts)
        verdict(f"greedy identity {dtype}", same == len(prompts), f"{same}/{len(prompts)} identical, batch 1")
    served = Server(8002)
    worst, matched, applied = 0.0, 0, 0
    for name in ("none", "remove", "act", "zero"):
        policy = policies.get(name)
        for prompt in prompts[:6]:
            request_id, tokens, logprobs = served.generate(prompt, 8, None if name == "none" else name)
            hf_tokens, hf_logprobs = transformers_reference(hf, profile, policy, prompt, 8)
            matched += tokens == hf_tokens
            worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, hf_logprobs)))
            applied += bool(served.record(request_id).get("interventions_applied")) and name != "none"
    verdict("interventions vs transformers (float32)", matched == 24 and worst <= LOGPROB_TOLERANCE and applied > 0,
            {"tokens_equal": f"{matched}/24", "max_abs_logprob_diff": worst, "requests_edited": applied})
    plain_same, ours, plain_default = Server(8003), Server(8004), Server(8005)
    for server in (ours, plain_same, plain_default):
        throughput(server, prompts, 64)  # warm-up
    rounds = {name: [throughput(s, prompts) for _ in range(3)]
              for name, s in (("sinkguard", ours), ("plain_same_settings", plain_same),
                              ("plain_vllm_defaults", plain_default))}
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    ratio = medians["sinkguard"] / medians["plain_same_settings"]
    verdict("throughput bfloat16 (tok/s)", ratio >= THROUGHPUT_TARGET,
            {**{k: round(v, 1) for k, v in medians.items()}, "sinkguard/plain_same": round(ratio, 3),
             "settings_cost (plain_same/plain_defaults)": round(medians["plain_same_settings"]
                                                                / medians["plain_vllm_defaults"], 3)})
    flashinfer = Server(8006)
    request_id, _, _ = flashinfer.generate(prompts[0], 8, "remove")
    edited = bool(flashinfer.record(request_id).get("interventions_applied"))
    for prompt in prompts[1:5]:
        flashinfer.generate(prompt, 8)
    for port in (8002, 8004, 8006):
        status = Server(port).status()
        keys = ("enabled", "compiled", "layer_op_calls", "steps", "unscanned_steps", "faults", "removed_reason",
                "detector_seconds")
        healthy = status["enabled"] and status["steps"] > 0 and not status["faults"] and not status["unscanned_steps"]
        if port == 8006:
            healthy = healthy and edited
        verdict(f"detector status :{port}", bool(healthy), {k: status.get(k) for k in keys})
    (work / "acceptance.json").write_text(json.dumps(results, indent=1))
    print(f"{len(results) - len(failures)} of {len(results)} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        prepare(folder)
    else:
        sys.exit(check(folder))
