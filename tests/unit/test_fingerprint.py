"""Weights identity on small tensors: precision-robust, sensitive to a merged LoRA delta."""

from __future__ import annotations

import torch

from sinkguard.core.fingerprint import (
    NORMS,
    PROJECTIONS,
    SAMPLE_SIZE,
    compare_identity,
    module_identity,
    sample_slot,
)

LAYERS, HIDDEN, INTERMEDIATE = 2, 32, 48


def transformers_params(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny float32 Llama-like state dict in transformers' naming."""
    g = torch.Generator().manual_seed(seed)
    params = {"model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        params[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        params[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            params[p + f"self_attn.{name}.weight"] = 0.05 * torch.randn(HIDDEN, HIDDEN, generator=g)
        params[p + "mlp.gate_proj.weight"] = 0.05 * torch.randn(INTERMEDIATE, HIDDEN, generator=g)
        params[p + "mlp.up_proj.weight"] = 0.05 * torch.randn(INTERMEDIATE, HIDDEN, generator=g)
        params[p + "mlp.down_proj.weight"] = 0.05 * torch.randn(HIDDEN, INTERMEDIATE, generator=g)
    return params


def vllm_params(params: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The same weights as vLLM holds them: q/k/v and gate/up fused, cast to the served dtype."""
    out = {}
    for name, weight in params.items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue
        if name.endswith("q_proj.weight"):
            stem = name[: -len("q_proj.weight")]
            name, weight = stem + "qkv_proj.weight", torch.cat(
                [params[stem + "q_proj.weight"], params[stem + "k_proj.weight"], params[stem + "v_proj.weight"]])
        elif name.endswith("gate_proj.weight"):
            stem = name[: -len("gate_proj.weight")]
            name, weight = stem + "gate_up_proj.weight", torch.cat(
                [params[stem + "gate_proj.weight"], params[stem + "up_proj.weight"]])
        out[name] = weight.to(dtype)
    return out


def identity(params: dict[str, torch.Tensor], **kwargs):
    return module_identity(params.items(), **kwargs)


def test_sample_slots_name_both_engines():
    assert sample_slot("model.layers.3.self_attn.q_proj.weight") == ("layers.3.q_rows", 0)
    assert sample_slot("model.layers.3.self_attn.qkv_proj.weight") == ("layers.3.q_rows", 0)
    assert sample_slot("model.language_model.layers.3.mlp.gate_up_proj.weight") == ("layers.3.gate_rows", 0)
    assert sample_slot("model.layers.3.mlp.down_proj.base_layer.weight") == ("layers.3.down_cols", 1)
    assert sample_slot("model.layers.3.self_attn.k_proj.weight") is None


def test_same_weights_in_both_engines_and_at_each_precision():
    params = transformers_params()
    calibrated = identity(params)
    assert set(calibrated.fingerprints) == {NORMS, PROJECTIONS} and calibrated.weights_dtype == "float32"
    exact = compare_identity(calibrated, identity(vllm_params(params, torch.float32)))
    assert exact.accepted and exact.relation == "same weights"
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        for served in (identity({k: v.to(dtype) for k, v in params.items()}), identity(vllm_params(params, dtype))):
            assert served.weights_dtype == name
            check = compare_identity(calibrated, served)
            assert check.accepted, check.message
            assert check.relation == "same weights at another precision"
            assert f"rounded to {name}" in check.message
    # a float32 model served against a profile calibrated on its bfloat16 copy: it rounds to it
    check = compare_identity(identity({k: v.to(torch.bfloat16) for k, v in params.items()}), calibrated)
    assert check.accepted and check.relation == "same weights at another precision"


def test_bfloat16_checkpoint_loaded_in_float32_is_the_same_weights():
    params = {k: v.to(torch.bfloat16) for k, v in transformers_params().items()}
    upcast = identity({k: v.float() for k, v in params.items()})
    check = compare_identity(upcast, identity(params))
    assert check.relation == "same weights", check.message
    assert upcast.fingerprint == identity(params).fingerprint
    # served in float16 from that bfloat16 checkpoint: vLLM casts the stored bf16 values, as the hash does
    check = compare_identity(upcast, identity({k: v.to(torch.float16) for k, v in params.items()}))
    assert check.accepted, check.message


def test_merged_lora_on_q_is_other_weights():
    params = transformers_params()
    g = torch.Generator().manual_seed(1)
    lora_b, lora_a = 0.01 * torch.randn(HIDDEN, 4, generator=g), torch.randn(4, HIDDEN, generator=g)
    q = "model.layers.1.self_attn.q_proj.weight"
    merged = dict(params, **{q: params[q] + lora_b @ lora_a})
    base, tuned = identity(params), identity(merged)
    assert base.fingerprints[NORMS] == tuned.fingerprints[NORMS]  # norms alone would accept it
    for served in (tuned, identity({k: v.to(torch.bfloat16) for k, v in merged.items()}),
                   identity(vllm_params(merged, torch.float16))):
        check = compare_identity(base, served)
        assert not check.accepted and check.relation == "other weights"
        assert "other weights" in check.message and "weights differ" in check.message


def calibrated_params(params):
    return [(k, v.to(torch.bfloat16)) for k, v in params.items()]


def test_calibrated_in_bfloat16_served_in_float16_cannot_tell():
    params = transformers_params()
    calibrated = identity({k: v.to(torch.bfloat16) for k, v in params.items()})
    check = compare_identity(calibrated, identity({k: v.to(torch.float16) for k, v in params.items()}))
    assert not check.accepted and check.relation == "cannot tell"
    assert "cannot tell" in check.message and "double rounding" in check.message
    assert "Calibrate on the float32 checkpoint" in check.message and "bfloat16 weights the profile" in check.message
    # and the other way round
    check = compare_identity(identity({k: v.to(torch.float16) for k, v in params.items()}),
                             identity({k: v.to(torch.bfloat16) for k, v in params.items()}))
    assert not check.accepted and check.relation == "cannot tell"
    # a float16 copy *of the bfloat16 weights* is the same values: accepted
    check = compare_identity(calibrated, identity({k: v.to(torch.float16) for k, v in calibrated_params(params)}))
    assert check.accepted, check.message


def test_norms_only_when_the_sample_is_missing_or_quantized():
    params = transformers_params()
    full = identity(params)
    rank1 = identity(vllm_params(params, torch.bfloat16), sample_projections=False)
    assert set(rank1.fingerprints) == {NORMS} and rank1.coverage == "norms only"
    check = compare_identity(full, rank1)
    assert check.accepted and "norm weights only" in check.message
    quantized = {k: (v.to(torch.int8) if "proj" in k else v) for k, v in params.items()}
    assert set(identity(quantized).fingerprints) == {NORMS}
    cpu_packed = {k: (torch.empty(0) if "proj" in k else v) for k, v in params.items()}  # vLLM's CPU backend
    assert set(identity(cpu_packed).fingerprints) == {NORMS}
    narrow = {k: (v[:, : SAMPLE_SIZE - 1] if "down_proj" in k else v) for k, v in params.items()}
    assert set(identity(narrow).fingerprints) == {NORMS}
    # other norms are other weights, whatever the coverage
    changed = dict(params, **{"model.layers.0.input_layernorm.weight": params["model.norm.weight"] * 1.01})
    assert not compare_identity(full, identity(changed, sample_projections=False)).accepted
