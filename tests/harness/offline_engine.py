"""Greedy generation through an offline vLLM engine, optionally with sinkguard detecting, in a
separate process (vLLM spawns workers, and one engine per process keeps tests and benchmarks from
sharing state). A test and benchmark harness, not package API:

    python tests/harness/offline_engine.py MODEL_DIR PROMPTS.json OUT.json MAX_TOKENS [SINKGUARD_CONFIG]

PROMPTS.json holds token-id lists. Without SINKGUARD_CONFIG the plugin stays inert (plain vLLM);
with it, OUT.json also holds each request's sink record (``{"tokens", "records"}``). Float32,
eager, no prefix caching (the reference path the tests compare vLLM's default mode with);
``engine.json`` next to PROMPTS.json, if present, adds engine arguments (e.g. a tiny KV cache that
forces preemptions, or ``{"enforce_eager": false, "enable_prefix_caching": true}``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def generate(model_dir: Path, prompts: list[list[int]], folder: Path, max_tokens: int,
             serve_config: Path | None = None, timeout: float = 900, engine_args: dict | None = None,
             extra_args: list[dict] | None = None) -> dict:
    """Run this module in a subprocess; returns ``{"tokens", "logprobs", "records", "status"}`` (``logprobs``:
    each generated token's log-probability; ``status``: the worker's sinkguard status). ``extra_args``:
    per-prompt ``vllm_xargs``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    (folder / "engine.json").write_text(json.dumps(engine_args or {}))
    (folder / "extra_args.json").write_text(json.dumps(extra_args or [None] * len(prompts)))
    command = [sys.executable, __file__, str(model_dir), str(folder / "prompts.json"), str(folder / "out.json"),
               str(max_tokens)] + ([str(serve_config)] if serve_config else [])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"offline vLLM run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((folder / "out.json").read_text())


def _main(argv: list[str]) -> None:
    model_dir, prompts_path, out_path, max_tokens = argv[:4]
    if len(argv) > 4:
        os.environ["SINKGUARD_CONFIG"] = argv[4]
    else:
        os.environ.pop("SINKGUARD_CONFIG", None)
    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(prompts_path).read_text())
    engine_file = Path(prompts_path).with_name("engine.json")
    engine_args = json.loads(engine_file.read_text()) if engine_file.exists() else {}
    llm = LLM(model=model_dir, **{"enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 2048,
                                  "seed": 0, "dtype": "float32", **engine_args})
    extra_file = Path(prompts_path).with_name("extra_args.json")
    extras = json.loads(extra_file.read_text()) if extra_file.exists() else [None] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=int(max_tokens), logprobs=1, extra_args=extra)
              for extra in extras]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    records, status = [], None
    if len(argv) > 4:
        records = [llm.collective_rpc("sinkguard_lookup", args=(o.request_id,))[0] for o in outputs]
        status = llm.collective_rpc("sinkguard_status")[0]
    logprobs = [[step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outputs]
    Path(out_path).write_text(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                                          "logprobs": logprobs, "records": records, "status": status}))


if __name__ == "__main__":
    _main(sys.argv[1:])
