"""The architecture contract and the exact attention path on every family sinkguard accepts.

Random-weight models of each family (a few layers, tiny dims) stand in for families whose trained
weights cannot be installed here; they check *structure*, which is what the contract is about:
which tensor a layer adds to the residual stream, and that sink scores come from the attention the
model really computes (sliding windows, soft-capping) rather than from a plain causal softmax.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from sinkguard.core.settings import AttentionConfig
from sinkguard.engines.architectures import CONTRACTS, mlp_output_module
from sinkguard.engines.hf.attention import AttentionRecorder, recording
from sinkguard.errors import ModelLoadError

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, vocab_size=512, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 6  # far below the test length, so the band really cuts

FAMILIES = {
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(**SMALL),
    "MistralForCausalLM": lambda: transformers.MistralConfig(**SMALL, sliding_window=WINDOW),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(**SMALL),
    "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(**SMALL),
    "Gemma2ForCausalLM": lambda: transformers.Gemma2Config(**SMALL, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                                                           query_pre_attn_scalar=32),
    "Gemma3ForCausalLM": lambda: transformers.Gemma3TextConfig(**SMALL, sliding_window=WINDOW, query_pre_attn_scalar=32,
                                                               sliding_window_pattern=2),
}


def save_random(folder, config, tokenizer):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # random init gives tiny attention logits; scale Q and K up so softmax (and soft-capping) bite
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory, hf_model):
    config = FAMILIES[request.param]()
    config.architectures = [request.param]
    return request.param, save_random(tmp_path_factory.mktemp(request.param), config, hf_model.tokenizer)


def test_every_contract_has_a_test_family():
    assert {name for contract in CONTRACTS for name in contract.architectures} == set(FAMILIES)


def test_contract_names_exactly_what_the_layer_adds_to_the_residual(family_dir):
    from sinkguard.engines.hf.runner import HFSinkModel

    architecture, folder = family_dir
    model = HFSinkModel.load(folder)
    assert model.info.architecture == architecture
    layer = model.layers[1]
    module = mlp_output_module(layer, model.contract)
    captured = {}
    ids = torch.randint(3, 512, (1, 24))

    def run(zero_contribution: bool) -> torch.Tensor:
        def on_contribution(_m, _a, output):
            captured["contribution"] = output.clone()
            return torch.zeros_like(output) if zero_contribution else None

        def on_layer(_m, _a, output):
            captured["out"] = (output[0] if isinstance(output, tuple) else output).clone()

        handles = [module.register_forward_hook(on_contribution), layer.register_forward_hook(on_layer)]
        try:
            with torch.no_grad():
                model.model.model(input_ids=ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return captured["out"]

    with_it = run(False)
    contribution = captured["contribution"]
    without = run(True)
    # removing the contract's tensor removes exactly that tensor from the layer's output
    torch.testing.assert_close(with_it - without, contribution, atol=1e-5, rtol=1e-4)
    assert contribution.abs().max() > 0


def test_sink_scores_equal_eager_attention_weights(family_dir):
    """The chunked path (band mask, soft-capping) against transformers' own eager attention."""
    from sinkguard.engines.hf.runner import HFSinkModel

    architecture, folder = family_dir
    ours = HFSinkModel.load(folder)
    eager = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(3, 512, (1, 40))
    attention = AttentionConfig(min_votes=1, query_chunk=8)
    recorder = AttentionRecorder(len(ours.layers), attention.min_votes, attention.query_chunk)
    with torch.no_grad(), recording(recorder):
        hidden = ours.model.model(input_ids=ids, use_cache=False).last_hidden_state
        reference = eager.model(input_ids=ids, use_cache=False, output_attentions=True)
    torch.testing.assert_close(hidden, reference.last_hidden_state, atol=1e-4, rtol=1e-4)
    windows = set()
    for layer, weights in enumerate(reference.attentions):
        window = recorder.windows[layer]
        windows.add(window)
        votes = torch.arange(40, 0, -1, dtype=torch.float32)
        if window is not None:
            votes = votes.clamp_max(window)
        torch.testing.assert_close(recorder.head_scores[layer], weights[0].sum(-2) / votes, atol=1e-5, rtol=1e-4)
    if architecture in ("MistralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        assert WINDOW in windows, "the sliding-window layers were recorded as full attention"
    # outside a scan the model still honours its window (transformers builds no mask for a custom
    # implementation unless a mask function is registered for it)
    with torch.no_grad():
        plain = ours.model(input_ids=ids).logits
        expected = eager(input_ids=ids).logits
    torch.testing.assert_close(plain, expected, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_refused_by_name(tmp_path, hf_model):
    from sinkguard.engines.hf.runner import HFSinkModel

    config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=512, max_position_embeddings=128)
    config.architectures = ["GPTNeoXForCausalLM"]
    folder = save_random(tmp_path / "neox", config, hf_model.tokenizer)
    with pytest.raises(ModelLoadError, match=r"GPTNeoXForCausalLM.*refused rather than guessed"):
        HFSinkModel.load(folder)
