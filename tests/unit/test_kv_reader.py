"""Reading keys and values back from a paged KV cache whose in-block layout the reader derives itself.

The real CPU backend is exercised end to end in tests/vllm (vLLM and transformers agree on every
attention intervention). Here two layouts vLLM's CPU build cannot produce on this machine stand in
for GPU backends: a packed one (keys transposed and interleaved in groups, values after them) and a
backend that loses data, which must be refused rather than read wrongly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sinkguard.engines.vllm.kv_cache import PagedKvReader
from sinkguard.errors import ConfigError

HEADS, BLOCK, DIM = 2, 8, 4


class PackedImpl:
    """Per (block, head): keys stored [D/2, BLOCK, 2] (pairs of dims interleaved, VNNI-like), then values [BLOCK, D]."""

    kv_cache_dtype = "auto"
    head_size = DIM

    def __init__(self, lossy: bool = False) -> None:
        self.lossy = lossy

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        region = kv_cache.view(kv_cache.shape[0], HEADS, -1)
        for token, slot in enumerate(slot_mapping.tolist()):
            block, offset = divmod(slot, BLOCK)
            for head in range(HEADS):
                for d in range(DIM):
                    k_at = (d // 2) * BLOCK * 2 + offset * 2 + d % 2
                    if not (self.lossy and d == 0):
                        region[block, head, k_at] = key[token, head, d]
                    region[block, head, BLOCK * DIM + offset * DIM + d] = value[token, head, d]


def write(impl, tokens: int, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cache = torch.zeros(6, HEADS, BLOCK, 2 * DIM)
    keys, values = torch.randn(tokens, HEADS, DIM), torch.randn(tokens, HEADS, DIM)
    slots = torch.tensor([blocks[t // BLOCK] * BLOCK + t % BLOCK for t in range(tokens)])
    impl.do_kv_cache_update(None, keys, values, cache, slots)
    return cache, keys, values


def test_keys_and_values_come_back_in_token_order_through_the_block_table():
    impl = PackedImpl()
    reader = PagedKvReader(SimpleNamespace(impl=impl))
    block_table = torch.tensor([4, 1, 3, 0])
    cache, keys, values = write(impl, 19, block_table.tolist())
    every_head = torch.arange(HEADS)
    got_keys, got_values, lengths = reader.read(cache, block_table[None], torch.tensor([19]), every_head)
    assert torch.equal(got_keys[:, 0, :19], keys.transpose(0, 1)) and torch.equal(got_values[:, 0, :19],
                                                                                  values.transpose(0, 1))
    # two requests in one read, one KV head: the shorter one's keys first, padding after its length
    both, _, lengths = reader.read(cache, torch.stack([block_table, torch.tensor([1, 3, 0, 0])]),
                                   torch.tensor([19, 5]), torch.tensor([1]))
    assert both.shape == (1, 2, 24, DIM) and lengths.tolist() == [19, 5]
    assert torch.equal(both[0, 1, :5], keys[8:13, 1])


def test_a_layout_that_loses_elements_is_refused_not_guessed():
    impl = PackedImpl(lossy=True)
    cache, _, _ = write(impl, 4, [0])
    with pytest.raises(ConfigError, match="cannot read the keys back from PackedImpl"):
        PagedKvReader(SimpleNamespace(impl=impl)).read(cache, torch.tensor([[0]]), torch.tensor([4]), torch.arange(2))


def test_quantized_kv_caches_are_refused():
    impl = PackedImpl()
    impl.kv_cache_dtype = "fp8_e4m3"
    with pytest.raises(ConfigError, match="unquantized KV cache"):
        PagedKvReader(SimpleNamespace(impl=impl))
