"""Greedy generation with an offline vLLM engine, run as a subprocess by the tests.

    python tests/vllm/plain_generate.py MODEL_DIR PROMPTS.json OUT.json MAX_TOKENS [SINKGUARD_CONFIG]

Without SINKGUARD_CONFIG the plugin stays inert (plain vLLM); with it, sinkguard detects online
and the script also writes each request's sink record (OUT.json -> {"tokens", "records"}).
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    model_dir, prompts_path, out_path, max_tokens = sys.argv[1:5]
    if len(sys.argv) > 5:
        os.environ["SINKGUARD_CONFIG"] = sys.argv[5]
    else:
        os.environ.pop("SINKGUARD_CONFIG", None)
    from vllm import LLM, SamplingParams

    prompts = json.loads(open(prompts_path).read())
    llm = LLM(model=model_dir, enforce_eager=True, enable_prefix_caching=False, max_model_len=2048, seed=0,
              dtype="float32")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=int(max_tokens)), use_tqdm=False)
    records = []
    if len(sys.argv) > 5:
        records = [llm.collective_rpc("sinkguard_lookup", args=(o.request_id,))[0] for o in outputs]
    with open(out_path, "w") as handle:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "records": records}, handle)
