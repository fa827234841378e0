"""One engine, one fixed program of requests, in a given vLLM mode; used by test_compiled_mode.py.

    python tests/vllm/mode_program.py MODEL_DIR PLAN.json OUT.json

PLAN.json: ``{"engine": {...LLM kwargs}, "phases": [{"name", "prompts", "policy", "max_tokens"}]}``.
Phases run one after the other (each a single ``LLM.generate`` batch), so a later phase can hit KV
that an earlier one left in the prefix cache. With ``$SINKGUARD_CONFIG`` set, every request's sink
record is read back. OUT.json: per phase, per request ``tokens``, ``logprobs`` (of the generated
tokens), ``cached`` (vLLM's own count of prompt tokens served from its prefix cache) and ``record``;
plus the workers' ``status``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model_dir, plan_path, out_path = sys.argv[1:4]
    plan = json.loads(Path(plan_path).read_text())
    llm = LLM(model=model_dir, **{"max_model_len": 2048, "seed": 0, "dtype": "float32", **plan["engine"]})
    observed = bool(os.environ.get("SINKGUARD_CONFIG"))
    out: dict = {"phases": {}}
    for phase in plan["phases"]:
        extra = {"sinkguard_policy": phase["policy"]} if phase.get("policy") else None
        params = SamplingParams(temperature=0.0, max_tokens=phase.get("max_tokens", 16), logprobs=0, extra_args=extra)
        outputs = llm.generate([{"prompt_token_ids": p} for p in phase["prompts"]], params, use_tqdm=False)
        results = []
        for o in outputs:
            completion = o.outputs[0]
            results.append({
                "tokens": list(completion.token_ids),
                "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                "cached": o.num_cached_tokens or 0,
                "record": llm.collective_rpc("sinkguard_lookup", args=(o.request_id,))[0] if observed else None,
            })
        out["phases"][phase["name"]] = results
    out["status"] = llm.collective_rpc("sinkguard_status")[0] if observed else None
    Path(out_path).write_text(json.dumps(out))
