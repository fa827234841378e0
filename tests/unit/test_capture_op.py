"""The in-graph capture (``layer_op.capturing_layer``): a decoder layer wrapped with it compiles whole
(``torch.compile(fullgraph=True)``: no graph break, no Python between layers), writes the detector's
statistics into the layer's buffer, and leaves the layer's bfloat16 outputs bit-identical to the
compiled layers without it, with the edit op on the MLP output too (when it edits nothing). (An opaque
op that also took the residual, sinkguard's earlier layer op, did not: on this stack it changed the
bfloat16 output by 0.016; checked when the test was written, not asserted, since it depends on
Inductor's fusion choices.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkguard.core.trace import captured_statistics, pair_statistics
from sinkguard.engines.vllm import layer_op

D, F, TOKENS = 96, 256, 24


class VllmLikeLayer(torch.nn.Module):
    """vLLM's decoder-layer contract: returns ``(mlp_output, residual)``, with its fused add + RMSNorm
    (float32 sum, residual rounded to the model dtype) between attention and MLP."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter((torch.randn(D, D, generator=generator) / D ** 0.5).to(dtype))
        self.gate_up = torch.nn.Parameter((torch.randn(2 * F, D, generator=generator) / D ** 0.5).to(dtype))
        self.down = torch.nn.Parameter((torch.randn(D, F, generator=generator) / F ** 0.5).to(dtype))
        self.norm = torch.nn.Parameter(torch.ones(D, dtype=dtype))

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        summed = hidden.float() + residual.float()
        residual = summed.to(hidden.dtype)
        normed = (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5)).to(hidden.dtype) * self.norm
        gate, up = torch.nn.functional.linear(torch.nn.functional.linear(normed, self.mix), self.gate_up).chunk(2, -1)
        return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.down), residual


class Stack(torch.nn.Module):
    """Decoder layers and a final fused add + RMSNorm: where a layer's outputs are read decides where
    Inductor rounds them (one layer alone does not show it)."""

    def __init__(self, dtype: torch.dtype, layers: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(VllmLikeLayer(dtype, seed) for seed in range(layers))

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        summed = hidden.float() + residual.float()
        return (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5)).to(hidden.dtype)


def with_capture(layer: VllmLikeLayer, seed: int = 1, index: int = 0, edit: bool = False) -> torch.Tensor:
    direction = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(seed)), dim=0)
    layer.register_buffer(layer_op.DIRECTION_BUFFER, direction, persistent=False)
    layer.register_buffer(layer_op.STATISTICS_BUFFER, torch.zeros(64, 4), persistent=False)
    edit_op, capture = layer_op.register()
    layer.forward = layer_op.capturing_layer(layer.forward, index, capture, edit_op if edit else None)
    return direction


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(TOKENS, D, generator=generator).to(dtype), torch.randn(TOKENS, D, generator=generator).to(dtype)


def test_layer_with_capture_compiles_whole_and_captures_the_statistics():
    layer = VllmLikeLayer(torch.float32)
    direction = with_capture(layer)
    calls = layer_op.capture_calls
    torch._dynamo.reset()
    with torch.no_grad():
        mlp_out, residual = torch.compile(layer.forward, fullgraph=True)(*inputs(torch.float32))
    assert layer_op.capture_calls > calls  # the op runs in the compiled graph
    captured = captured_statistics(getattr(layer, layer_op.STATISTICS_BUFFER)[None, :TOKENS])
    pair = torch.stack((mlp_out, residual + mlp_out))[None]  # [L=1, 2, T, d]
    expected = pair_statistics(pair, direction[None, :, None])
    for name in ("mlp_norm", "hidden_norm", "mlp_cos", "hidden_cos"):
        np.testing.assert_allclose(captured[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.all(getattr(layer, layer_op.STATISTICS_BUFFER)[TOKENS:].numpy() == 0)  # only the step's rows


@pytest.mark.parametrize("edit", [False, True], ids=["observe", "with_edit_op"])
def test_capture_leaves_compiled_bfloat16_outputs_bit_identical(edit):
    torch._dynamo.reset()
    layer_op.set_handler(None)  # the edit op edits nothing: a request without a policy
    with torch.no_grad():
        expected = torch.compile(Stack(torch.bfloat16), fullgraph=True)(*inputs(torch.bfloat16))
        torch._dynamo.reset()
        captured = Stack(torch.bfloat16)
        for index, layer in enumerate(captured.layers):
            with_capture(layer, seed=index + 1, index=index, edit=edit)
        got = torch.compile(captured, fullgraph=True)(*inputs(torch.bfloat16))
    assert torch.equal(got, expected)
    assert all(getattr(layer, layer_op.STATISTICS_BUFFER)[:TOKENS].abs().sum() > 0 for layer in captured.layers)


def test_edit_op_runs_python_at_every_call_and_the_capture_reads_its_edit():
    layer = VllmLikeLayer(torch.float32)
    with_capture(layer, edit=True, index=3)
    seen = []

    def handler(index: int, mlp_out: torch.Tensor) -> None:  # an MLP edit: zero the first token's output
        seen.append(index)
        mlp_out[0] = 0

    layer_op.set_handler(handler)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer.forward, fullgraph=True)
        with torch.no_grad():
            for _ in range(2):
                mlp_out, _ = compiled(*inputs(torch.float32))
    finally:
        layer_op.set_handler(None)
    assert seen == [3, 3]  # not frozen at trace time
    assert torch.all(mlp_out[0] == 0) and torch.all(mlp_out[1:].abs().sum(-1) > 0)
    statistics = getattr(layer, layer_op.STATISTICS_BUFFER)
    assert statistics[0, 0] == 0 and torch.all(statistics[1:TOKENS, 0] > 0)  # MLP norm after the edit
