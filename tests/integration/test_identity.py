"""The embedded model's weights identity: the same across precisions and from the checkpoint files,
different for a merged LoRA delta that leaves every norm weight alone."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkguard.core.fingerprint import NORMS, PROJECTIONS, compare_identity, module_identity
from sinkguard.errors import ProfileError
from sinkguard.sources.models import checkpoint_fingerprint


def test_identity_samples_projections(hf_model):
    identity = hf_model.info.weights
    assert set(identity.fingerprints) == {NORMS, PROJECTIONS}
    assert hf_model.info.weights_dtype == "float32"


def test_float32_profile_accepts_the_model_in_bfloat16(hf_model):
    from sinkguard.engines.hf.runner import HFSinkModel

    bf16 = HFSinkModel.load(hf_model.source.path, dtype=torch.bfloat16)
    assert bf16.info.weights_dtype == "bfloat16"
    check = hf_model.info.identity_check(bf16.info)
    assert check.accepted and check.relation == "same weights at another precision", check.message
    # the embedded model's norms are bf16-exact, its projections are not: the sample is what needs rounding
    assert hf_model.info.fingerprints[NORMS]["float32"] == bf16.info.fingerprints[NORMS]["float32"]
    assert hf_model.info.fingerprint != bf16.info.fingerprint
    # and the same comparison for float16 weights, without loading a third copy
    fp16 = module_identity((name, p.detach().to(torch.float16)) for name, p in hf_model.model.named_parameters())
    check = compare_identity(hf_model.info.weights, fp16)
    assert check.accepted and "rounded to float16" in check.message


def test_checkpoint_identity_agrees_with_the_loaded_model(hf_model):
    identity = checkpoint_fingerprint(hf_model.source.path)
    assert identity == hf_model.info.weights
    assert compare_identity(hf_model.info.weights, identity).relation == "same weights"


def test_merged_lora_delta_is_refused(hf_model, profile, tmp_path):
    copy = tmp_path / "lora-merged"
    shutil.copytree(hf_model.source.path, copy)
    weights = load_file(str(copy / "model.safetensors"))
    name = "model.layers.5.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(0)
    rank, out_dim, in_dim = 8, *weights[name].shape
    delta = (torch.randn(out_dim, rank, generator=g) @ torch.randn(rank, in_dim, generator=g)) * 1e-3
    weights[name] = weights[name] + delta
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})

    merged = checkpoint_fingerprint(copy)
    assert merged.fingerprints[NORMS] == hf_model.info.fingerprints[NORMS]  # a norms-only identity would pass it
    check = compare_identity(hf_model.info.weights, merged)
    assert not check.accepted and check.relation == "other weights", check.message

    from sinkguard.engines.hf.runner import HFSinkModel

    loaded = HFSinkModel.load(copy)
    assert loaded.info.weights == merged
    with pytest.raises(ProfileError, match="other weights"):
        profile.check_model(loaded.info)
    profile.check_model(hf_model.info)
