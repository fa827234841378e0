"""Greedy generation with plain vLLM (sinkguard disabled), run as a subprocess by the tests.

    python tests/vllm/plain_generate.py MODEL_DIR PROMPTS.json OUT.json MAX_TOKENS
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ.pop("SINKGUARD_CONFIG", None)  # plain vLLM: the plugin stays inert
    from vllm import LLM, SamplingParams

    model_dir, prompts_path, out_path, max_tokens = sys.argv[1:5]
    prompts = json.loads(open(prompts_path).read())
    llm = LLM(model=model_dir, enforce_eager=True, enable_prefix_caching=False, max_model_len=2048, seed=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=int(max_tokens)))
    with open(out_path, "w") as handle:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], handle)
