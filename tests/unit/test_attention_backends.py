"""Attention edits read a request's KV through the backend's per-step metadata; detection reads none.
Each GPU backend's metadata class of the installed vLLM is built here (FlashInfer's module needs the
``flashinfer`` package, absent on this CPU build, so its dataclass is read from vLLM's source)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sinkguard.engines.vllm.kv_cache import KV_METADATA_BACKENDS, check_kv_backend, request_kv_rows
from sinkguard.errors import ConfigError

BACKENDS = {  # backend name -> (module, metadata class, backend class)
    "FLASH_ATTN": ("flash_attn", "FlashAttentionMetadata", "FlashAttentionBackend"),
    "TRITON_ATTN": ("triton_attn", "TritonAttentionMetadata", "TritonAttentionBackend"),
    "CPU_ATTN": ("cpu_attn", "CPUAttentionMetadata", "CPUAttentionBackend"),
}


def _module(name: str):
    return importlib.import_module(f"vllm.v1.attention.backends.{name}")


def build_metadata(cls: type, block_table: torch.Tensor, seq_lens: torch.Tensor):
    """An instance of a backend's metadata dataclass: the two fields edits read are real, the rest
    placeholders (edits never read them)."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name == "block_table":
            values[field.name] = block_table
        elif field.name == "seq_lens":
            values[field.name] = seq_lens
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            values[field.name] = None
    return cls(**values)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_known_backends_metadata_gives_each_requests_kv_rows(name):
    module, metadata_name, backend_name = BACKENDS[name]
    backend = getattr(_module(module), backend_name)
    assert backend.get_name() == name and name in KV_METADATA_BACKENDS
    block_table, seq_lens = torch.arange(12, dtype=torch.int32).view(3, 4), torch.tensor([5, 17, 1], dtype=torch.int32)
    rows = request_kv_rows(build_metadata(getattr(_module(module), metadata_name), block_table, seq_lens))
    assert rows[0] is block_table and rows[1] is seq_lens
    check_kv_backend(0, SimpleNamespace(attn_backend=backend), "policies act")  # accepted: no error


def _flashinfer_metadata_fields() -> set[str]:
    source = Path(importlib.util.find_spec("vllm.v1.attention.backends").submodule_search_locations[0])
    tree = ast.parse((source / "flashinfer.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FlashInferMetadata")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def test_flashinfer_metadata_has_no_request_rows_so_attention_policies_are_refused_by_name():
    fields = _flashinfer_metadata_fields()
    assert fields and not {"block_table", "seq_lens", "query_start_loc"} & fields
    flashinfer = SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: "FLASHINFER"))
    with pytest.raises(ConfigError, match=r"policies act, zerotuning\).*backend FLASHINFER \(layer 3\)") as error:
        check_kv_backend(3, flashinfer, "policies act, zerotuning")
    assert "detection and MLP policies work on any backend" in str(error.value)
    with pytest.raises(TypeError, match="no block_table"):
        request_kv_rows(SimpleNamespace(paged_kv_indptr=torch.zeros(2)))
