"""A restart loads vLLM's compiled model from its cache, with sinkguard's op in it.

vLLM 0.32 on CPU saved the compiled model as an AOT artifact but never managed to load it back
("Compiling model again due to a load failure ... 'function' object has no attribute
'finalize_loading'"), so every start compiled again; ``sinkguard/engines/vllm/startup.py`` explains
and works around it. Two engines start one after the other on one fresh vLLM cache folder, in
vLLM's default mode and bfloat16 (what `sinkguard serve` serves by default): the first compiles
and saves, the second must load the artifact, run sinkguard's op (the post-condition on the warm-up
refuses start-up otherwise) and detect the same sinks. Both must log one line, not one warning
per weight, for the float32 -> bfloat16 weight conversion.

Cost: two offline engine starts, one compiling and one loading: 5.6 min on the 2-core machine while
other jobs ran (7.5 min before the fix, when the second start compiled again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import script

from sinkguard.serving.settings import ServeConfig

pytestmark = pytest.mark.slow

AOT_SAVED = "saved AOT compiled function"
AOT_LOADED = "Directly load AOT compilation"
AOT_LOAD_FAILED = "Compiling model again"
DTYPE_WARNING = "Attempted to load weight"
DTYPE_SUMMARY = "sinkguard: loading float32 checkpoint weights into bfloat16 parameters"


def cache_lines(log: str) -> str:
    """The log lines that say what vLLM did with its compile cache (for failure messages)."""
    return "\n".join(line for line in log.splitlines() if "AOT" in line or AOT_LOAD_FAILED in line)


def start_engine(model_dir: Path, prompts: list[list[int]], folder: Path, config: Path, cache_root: Path) -> tuple:
    """One offline engine (``tests/harness/offline_engine.py``) in its own process: (out.json, its log)."""
    folder.mkdir(parents=True)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    (folder / "engine.json").write_text(json.dumps({"enforce_eager": False, "dtype": "bfloat16"}))
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache_root), "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [sys.executable, str(script("offline_engine")), str(model_dir), str(folder / "prompts.json"),
               str(folder / "out.json"), "8", str(config)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return json.loads((folder / "out.json").read_text()), log


def test_restart_loads_the_compiled_model_and_still_detects(hf_model, online_prompts, served_profile, tmp_path):
    config = tmp_path / "serve.json"
    config.write_text(ServeConfig(profile=str(served_profile[0]), metrics=False).model_dump_json())
    cache_root = tmp_path / "vllm-cache"
    prompts = online_prompts[:4]
    cold, cold_log = start_engine(hf_model.source.path, prompts, tmp_path / "cold", config, cache_root)
    warm, warm_log = start_engine(hf_model.source.path, prompts, tmp_path / "warm", config, cache_root)

    assert AOT_SAVED in cold_log and AOT_LOADED not in cold_log, cache_lines(cold_log)
    assert AOT_LOADED in warm_log, cache_lines(warm_log)
    assert AOT_LOAD_FAILED not in warm_log and AOT_SAVED not in warm_log, cache_lines(warm_log)
    for run, log in ((cold, cold_log), (warm, warm_log)):
        assert run["status"]["compiled"] and run["status"]["layer_op_calls"] > 0
        assert DTYPE_WARNING not in log and log.count(DTYPE_SUMMARY) == 1
        assert all(record and record[0]["events"] for record in run["records"])
    # the loaded graph is the saved one: same tokens, same sinks
    assert warm["tokens"] == cold["tokens"]
    events = [[(e["position"], e["kind"]) for e in record[0]["events"]] for record in cold["records"]]
    assert [[(e["position"], e["kind"]) for e in record[0]["events"]] for record in warm["records"]] == events
    assert any(kind == "secondary" for record in events for _, kind in record)
