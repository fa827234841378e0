"""Read one request's keys and values back from vLLM's paged KV cache, whatever the backend packs.

Attention interventions recompute a request's attention at one layer, so they need the keys and
values of every earlier token, which live only in the paged cache. vLLM 0.32 gives each layer a
logical view ``[num_blocks, num_kv_heads, block_size, content]`` (``vllm/v1/kv_cache_layout.py``),
but what a backend writes inside a block is its own business: the CPU backend stores keys
transposed (float32, "vec") or VNNI-packed (bfloat16 on AMX hosts), GPU backends split K and V.
Rather than hard-coding any of that, :class:`PagedKvReader` asks the backend: it writes known
values through the layer's own ``impl.do_kv_cache_update`` into a two-block scratch cache and reads
where each ``(kv head, token, dim)`` of K and of V landed. Identifiers are written base 16, one
digit per pass, so every value is a small integer that any float format stores exactly. The map
must be the same in both scratch blocks and cover every element once, else the reader refuses.

:func:`attention_layers` finds each decoder layer's vLLM attention module, refuses what attention
edits do not model, and attaches the layer's reader; :func:`attention_window` translates its
sliding window.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from sinkguard.errors import ConfigError

if TYPE_CHECKING:
    from sinkguard.interventions.attention_edits import AttentionEdit

_BASE = 16
# Attention backends whose per-step metadata carries the request rows' ``block_table`` and ``seq_lens``
# (read by :meth:`PagedKvReader.read_edits`), checked against vLLM 0.32's metadata classes
# (tests/unit/test_attention_backends.py). FlashInfer's metadata has neither; other backends are
# unchecked. Detection and MLP edits never read attention metadata and work on any backend.
KV_METADATA_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


def request_kv_rows(metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_table [R, max blocks], seq_lens [R])`` of a step's attention metadata, one row per
    scheduled request (the fields every backend of :data:`KV_METADATA_BACKENDS` carries)."""
    block_table, seq_lens = getattr(metadata, "block_table", None), getattr(metadata, "seq_lens", None)
    if not isinstance(block_table, torch.Tensor) or not isinstance(seq_lens, torch.Tensor):
        raise TypeError(f"{type(metadata).__name__} carries no block_table / seq_lens tensors")
    return block_table, seq_lens


def backend_name(attn: Any) -> str:
    backend = getattr(attn, "attn_backend", None)
    return backend.get_name() if backend is not None else type(attn.impl).__name__


def check_kv_backend(index: int, attn: Any, reason: str) -> None:
    """ConfigError, at start-up, when attention edits cannot find a request's KV on this backend."""
    name = backend_name(attn)
    if name not in KV_METADATA_BACKENDS:
        raise ConfigError(
            f"attention interventions ({reason}) read each request's keys from the paged KV cache through the "
            f"attention backend's metadata, and sinkguard does not know the metadata of backend {name} (layer "
            f"{index}); it knows {', '.join(KV_METADATA_BACKENDS)}. Remove attention_redistribution / "
            "first_token_scaling from those policies, or serve with --attention-backend FLASH_ATTN; detection "
            "and MLP policies work on any backend")


def attention_layers(layers: list[torch.nn.Module], reason: str = "policies that edit attention"
                     ) -> list[tuple[int, Any]]:
    """Each decoder layer's vLLM attention module (with its :class:`PagedKvReader` attached as
    ``_sinkguard_reader``), checked for what attention edits can honour. ``reason`` names the
    policies that need them, for the refusal."""
    from vllm.model_executor.layers.attention.attention import Attention

    found = []
    for index, layer in enumerate(layers):
        modules = [m for m in layer.modules() if isinstance(m, Attention)]
        if len(modules) != 1:
            raise ConfigError(f"attention interventions: decoder layer {index} has {len(modules)} vLLM attention "
                              "modules, expected one")
        attn = modules[0]
        check_kv_backend(index, attn, reason)
        impl = attn.impl
        for name, unsupported in (("logits_soft_cap", bool(getattr(impl, "logits_soft_cap", 0) or 0)),
                                  ("sinks", getattr(impl, "sinks", None) is not None),
                                  ("alibi_slopes", getattr(impl, "alibi_slopes", None) is not None)):
            if unsupported:
                raise ConfigError(f"attention interventions do not model {name} (layer {index}, "
                                  f"{type(impl).__name__}); remove attention_redistribution/first_token_scaling "
                                  "from the policies for this model")
        if getattr(attn, "_sinkguard_reader", None) is None:
            attn._sinkguard_reader = PagedKvReader(attn)
        found.append((index, attn))
    return found


def attention_window(impl: Any) -> int | None:
    """The layer's sliding window in sinkguard's convention (query i sees ``i - w < j <= i``): CPU
    backends store the window (-1: none), FlashAttention ``(w - 1, 0)`` (``(-1, -1)``: none)."""
    window = getattr(impl, "sliding_window", None)
    if isinstance(window, tuple):
        return window[0] + 1 if window[0] >= 0 else None
    return int(window) if window is not None and window > 0 else None


class PagedKvReader:
    """Gathers ``[tokens, Hkv, D]`` keys and values of one request from one layer's paged cache."""

    def __init__(self, attention_layer: Any) -> None:
        self.layer = attention_layer
        impl = attention_layer.impl
        dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
        if dtype not in ("auto", "float32", "float16", "bfloat16", "float", "half"):
            raise ConfigError(f"attention interventions need an unquantized KV cache, not kv_cache_dtype={dtype!r}: "
                              "serve with --kv-cache-dtype auto")
        self._maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._strides: dict[int, tuple[int, int] | None] = {}  # id(map) -> affine (token, dim) strides

    def read_edits(self, kv_cache: torch.Tensor, metadata: Any, edits: list[AttentionEdit], kv_heads: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`read` for the requests of attention ``edits`` (``edit.request``: the request's row in the
        step's attention ``metadata``, whose ``block_table`` and ``seq_lens`` say where its tokens are)."""
        block_table, seq_lens = request_kv_rows(metadata)
        requests = torch.tensor([edit.request for edit in edits], device=block_table.device)
        return self.read(kv_cache, block_table.index_select(0, requests),
                         seq_lens.index_select(0, requests.to(seq_lens.device)), kv_heads)

    def read(self, kv_cache: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
             kv_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values of B requests on the KV heads ``kv_heads``: ``block_tables`` [B, max blocks]
        (their block table rows), ``lengths`` [B] (tokens each has so far). Returns ``(keys [h, B, K, D],
        values [h, B, K, Dv], lengths)``, head-major (what the attention matmuls read without a copy),
        with K = the longest request's blocks x block size; positions past a request's length are
        padding. Only the needed elements are gathered, not whole blocks."""
        key_map, value_map = self._map_for(kv_cache)
        block_size = kv_cache.shape[2]
        lengths = lengths.to(torch.long).cpu()
        used = max(1, math.ceil(int(lengths.max()) / block_size))
        blocks = block_tables[:, :used].to(device=kv_cache.device, dtype=torch.long).reshape(-1, 1)
        batch = block_tables.shape[0]
        kv_heads = kv_heads.to(kv_cache.device)
        block_numel = kv_cache[0].numel()

        def gather(index: torch.Tensor) -> torch.Tensor:  # index [Hkv, block_size, D]: offsets in a block
            chosen = index.index_select(0, kv_heads)
            heads, dim = chosen.shape[0], chosen.shape[2]
            strides = self._strides[id(index)] if kv_cache.is_contiguous() else None
            if strides is not None:  # each head's tokens x dims are a strided grid in a block: one strided copy
                # per head, straight into a head-major buffer (what the attention matmuls read without copying)
                out = torch.empty(heads, batch * used, block_size, dim, dtype=kv_cache.dtype, device=kv_cache.device)
                for row, h in enumerate(kv_heads.tolist()):
                    grid = torch.as_strided(kv_cache, (kv_cache.shape[0], block_size, dim), (block_numel, *strides),
                                            kv_cache.storage_offset() + int(index[h, 0, 0]))
                    torch.index_select(grid, 0, blocks.flatten(), out=out[row])
                return out.view(heads, batch, used * block_size, dim)
            if kv_cache.is_contiguous():  # one flat gather of exactly the needed elements
                picked = kv_cache.view(-1)[blocks * block_numel + chosen.reshape(1, -1)]
            else:  # offsets -> (head, slot, content) coordinates of the logical block view: any strides
                coords = torch.unravel_index(chosen.reshape(1, -1), tuple(kv_cache.shape[1:]))
                picked = kv_cache[(blocks, *coords)]
            picked = picked.view(batch, used, heads, block_size, dim)
            return picked.permute(2, 0, 1, 3, 4).reshape(heads, batch, used * block_size, dim)

        return gather(key_map), gather(value_map), lengths

    def _map_for(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signature = (tuple(kv_cache.shape[1:]), kv_cache.dtype, kv_cache.device, getattr(self.layer, "isa", None))
        if signature not in self._maps:
            maps = self._maps[signature] = self._derive(kv_cache)
            for index in maps:  # the layout test runs once per map, not in every step
                self._strides[id(index)] = _affine(index)
        return self._maps[signature]

    def _derive(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_map, value_map)`` [Hkv, block_size, D]: each element's flat offset in a block."""
        _, heads, block_size, _ = kv_cache.shape
        impl = self.layer.impl
        head_dim = int(impl.head_size)
        value_dim = int(getattr(impl, "head_size_v", head_dim) or head_dim)
        slots = torch.arange(2 * block_size, device=kv_cache.device)
        ids = torch.arange(heads * block_size, device=kv_cache.device).view(heads, block_size, 1)
        key_ids = (ids * head_dim + torch.arange(head_dim, device=kv_cache.device)).permute(1, 0, 2)  # [bs, Hkv, D]
        value_ids = (ids * value_dim + torch.arange(value_dim, device=kv_cache.device)).permute(1, 0, 2)
        total = heads * block_size * max(head_dim, value_dim)
        passes = max(1, math.ceil(math.log(total, _BASE)))
        found_key = torch.zeros(2, kv_cache[0].numel(), dtype=torch.long, device=kv_cache.device)
        found_value = torch.zeros_like(found_key)
        written_key = torch.zeros(2, kv_cache[0].numel(), dtype=torch.bool, device=kv_cache.device)
        written_value = torch.zeros_like(written_key)
        for digit in range(passes):
            for ids_, found, written, is_key in ((key_ids, found_key, written_key, True),
                                                 (value_ids, found_value, written_value, False)):
                payload = (ids_ // _BASE**digit) % _BASE + 1  # 1..16: 0 means "not written"
                tokens = payload.repeat(2, 1, 1).to(kv_cache.dtype)  # both scratch blocks, same ids
                zeros_k = torch.zeros(2 * block_size, heads, head_dim, dtype=kv_cache.dtype, device=kv_cache.device)
                zeros_v = torch.zeros(2 * block_size, heads, value_dim, dtype=kv_cache.dtype, device=kv_cache.device)
                scratch = torch.zeros((2, *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
                impl.do_kv_cache_update(self.layer, tokens if is_key else zeros_k, zeros_v if is_key else tokens,
                                        scratch, slots)
                values = scratch.reshape(2, -1).round().long()
                written |= values > 0
                found += (values - 1).clamp_min(0) * _BASE**digit
        return (self._invert(found_key, written_key, (heads, block_size, head_dim), "keys"),
                self._invert(found_value, written_value, (heads, block_size, value_dim), "values"))

    def _invert(self, found: torch.Tensor, written: torch.Tensor, shape: tuple[int, int, int], what: str
                ) -> torch.Tensor:
        count = shape[0] * shape[1] * shape[2]
        offsets = written[0].nonzero().flatten()
        ids = found[0, offsets]
        backend = type(self.layer.impl).__name__
        complete = offsets.numel() == count and torch.equal(ids.sort().values, torch.arange(count, device=ids.device))
        if not (complete and torch.equal(written[0], written[1]) and torch.equal(found[0], found[1])):
            raise ConfigError(f"sinkguard cannot read the {what} back from {backend}'s KV cache blocks (layout not "
                              "recognised); attention interventions are not available with this backend")
        index = torch.empty(count, dtype=torch.long, device=ids.device)
        index[ids] = offsets
        return index.view(shape)


def _affine(index: torch.Tensor) -> tuple[int, int] | None:
    """``(token stride, dim stride)`` if every head's offsets ``index[h]`` [block_size, D] are
    ``start_h + t * token_stride + d * dim_stride`` (plain or transposed layouts), else None."""
    if index.shape[1] < 2 or index.shape[2] < 2:
        return None
    token_stride = int(index[0, 1, 0] - index[0, 0, 0])
    dim_stride = int(index[0, 0, 1] - index[0, 0, 0])
    grid = (torch.arange(index.shape[1], device=index.device)[:, None] * token_stride
            + torch.arange(index.shape[2], device=index.device)[None, :] * dim_stride)
    if torch.equal(index - index[:, :1, :1], grid.expand_as(index)):
        return token_stride, dim_stride
    return None
