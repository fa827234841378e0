"""An 8k-token input scans on this 24 GiB machine, attention scores included.

The naive route (all attention maps returned) needs ~20 GB at 4k tokens and cannot run at 8k;
benchmarks/bench_scan.py measures time and memory of both.
"""

from __future__ import annotations

import resource

import numpy as np
import pytest

from sinkguard.offline.scanner import scan_prompt
from sinkguard.sources.prompts import _builtin_documents


@pytest.mark.slow
def test_8k_token_scan(hf_model, scan_config):
    ids: list[int] = []
    for _name, text in _builtin_documents():
        ids += hf_model.tokenize(text, add_bos=False)
        if len(ids) >= 8191:
            break
    ids = [hf_model.tokenizer.bos_token_id, *ids[:8191]]
    assert len(ids) == 8192 == hf_model.context_length
    result = scan_prompt(hf_model, ids, scan_config)
    scores = result.trace.sink_scores
    assert scores.shape == (hf_model.info.num_layers, 8192)
    assert np.isfinite(scores[:, : 8192 - scan_config.attention.min_votes + 1]).all()
    assert len(result.as_result.secondary) >= 10
    assert result.detection.reference == 0
    # memory grows like T x hidden per layer, not T^2 x heads x layers (which would be ~30 GB here)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gb < 8, f"peak RSS {peak_gb:.1f} GB"
