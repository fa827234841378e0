"""One engine, one fixed program of requests, in a given vLLM mode; used by test_compiled_mode.py.

    python tests/vllm/mode_program.py MODEL_DIR PLAN.json OUT.json

PLAN.json: ``{"engine": {...LLM kwargs}, "phases": [{"name", "prompts", "policy", "max_tokens"}]}``.
Phases run one after the other (each a single ``LLM.generate`` batch), so a later phase can hit KV
that an earlier one left in the prefix cache. With ``$SINKGUARD_CONFIG`` set, every request's sink
record is read back. OUT.json: per phase, per request ``tokens``, ``logprobs`` (of the generated
tokens), ``cached`` (vLLM's own count of prompt tokens served from its prefix cache) and ``record``;
plus the workers' ``status`` and ``layout_check``: every step's batch layout as sinkguard reads it from the
runner's host structures (``batch_layout.py``), compared with the positions the runner hands the model and
the row offsets of its attention metadata; ``host_reads``: per step, the reads of device data by the host
in sinkguard's hooks (``host_reads.py``); and the compiled graph's ``splitting_ops``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def check_layouts(worker: Any) -> None:
    """In the worker: wrap the runner's ``_model_forward`` (outside sinkguard's own wrapper)."""
    import numpy as np
    from vllm.forward_context import get_forward_context

    from sinkguard.engines.vllm.batch_layout import read_batch_layout

    runner = worker.model_runner
    inner = runner._model_forward
    counts = {"steps": 0, "tokens": 0, "mismatches": []}

    def checked(*args: Any, **kwargs: Any) -> Any:
        layout = read_batch_layout(runner)
        metadata = next(iter(get_forward_context().attn_metadata.values()))
        given = kwargs["positions"][:layout.num_tokens].cpu().numpy()
        rows = metadata.query_start_loc.cpu().numpy()[:len(layout.query_start)]
        counts["steps"] += 1
        counts["tokens"] += layout.num_tokens
        if not (np.array_equal(given, layout.positions) and np.array_equal(rows, layout.query_start)
                and layout.request_ids == list(runner.input_batch.req_ids)):
            counts["mismatches"].append({"positions": given.tolist(), "read": layout.positions.tolist()})
        return inner(*args, **kwargs)

    runner._model_forward = checked
    worker.layout_check = counts


def layout_check(worker: Any) -> dict:
    return worker.layout_check


def count_host_reads(worker: Any) -> None:
    """In the worker: count the host reads of device data in sinkguard's hooks, per step (``host_reads.py``)."""
    from host_reads import count_runtime_reads  # this program's folder leads sys.path, the engine's too

    from sinkguard.engines.vllm.worker_rpc import runtime_of

    worker.host_reads = count_runtime_reads(runtime_of(worker), worker.model_runner)


def host_reads(worker: Any) -> list[dict]:
    return worker.host_reads.steps


def name_phase(worker: Any, name: str) -> None:
    worker.host_reads.phase = name


def splitting_ops(worker: Any) -> list[str]:
    return list(worker.model_runner.vllm_config.compilation_config.splitting_ops or [])


if __name__ == "__main__":
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the layout check is a function sent to the worker
    from vllm import LLM, SamplingParams

    model_dir, plan_path, out_path = sys.argv[1:4]
    plan = json.loads(Path(plan_path).read_text())
    llm = LLM(model=model_dir, **{"max_model_len": 2048, "seed": 0, "dtype": "float32", **plan["engine"]})
    observed = bool(os.environ.get("SINKGUARD_CONFIG"))
    if observed:
        llm.collective_rpc(check_layouts)
        llm.collective_rpc(count_host_reads)
    out: dict = {"phases": {}}
    for phase in plan["phases"]:
        if observed:
            llm.collective_rpc(name_phase, args=(phase["name"],))
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
    out["layout_check"] = llm.collective_rpc(layout_check)[0] if observed else None
    out["host_reads"] = llm.collective_rpc(host_reads)[0] if observed else None
    out["splitting_ops"] = llm.collective_rpc(splitting_ops)[0]
    Path(out_path).write_text(json.dumps(out))
