"""Start a vLLM engine with sinkguard enabled and the given settings; used by refusal tests.

    python tests/vllm/start_engine.py MODEL_DIR '{"enforce_eager": false}'
Exits 0 after one generation, non-zero with vLLM's error otherwise.
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
    kwargs = {"enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 512, **overrides}
    llm = LLM(model=model_dir, **kwargs)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=2))
    print("STARTED")
