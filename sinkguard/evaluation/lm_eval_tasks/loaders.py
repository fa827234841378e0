"""Dataset loaders of sinkguard's local lm-eval tasks (``custom_dataset: !function loaders.<name>``).

lm-eval resolves ``!function`` relative to the YAML file, while ``data_files`` would be resolved
relative to the current directory: loading the JSONL from here makes the tasks work from any
directory, with plain ``lm_eval --include_path`` as well as through ``sinkguard lm-eval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _jsonl(name: str) -> Any:
    import datasets

    # the local "json" builder: no hub access (runs with HF_DATASETS_OFFLINE=1)
    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def multiple_choice(**_: Any) -> Any:
    """sinkguard_mc: 20 four-choice questions in the shape ``sinkguard eval --mmlu-file`` also reads."""
    return _jsonl("sinkguard_mc.jsonl")


def texts(**_: Any) -> Any:
    """sinkguard_ppl: short plain-English texts for a rolling log-likelihood (perplexity) task."""
    return _jsonl("sinkguard_ppl.jsonl")
