"""The model's forward passes over the slot KV cache: packed prefill, chunked prefill and decode.

`SlotDecoder` puts the layers together: the model's wiring (wiring.py), the cache (kv_cache.py) and
the attention variants (attention.py). Every call names the cache slots it reads and writes; which
request is in which slot is decided by the scheduler (scheduler.py) and comes in through the runner.

Shapes can be padded for batch invariance (see `prefill` and `decode`): on CUDA every decode runs
the matmuls over a fixed number of rows, so a sequence gets the same numbers alone or in a full
batch, and greedy answers do not depend on what else is running.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import chunk_attention, flex_mask, packed_attention, packed_causal, per_prompt_causal
from .kv_cache import KVCache, auto_slots
from .wiring import DecodeRows, decode_layer, finish_layer, qkv, wire

DECODE_ATTENTION = ("sdpa", "flex")


class SlotDecoder:
    def __init__(self, model: nn.Module, adapters: list[str], slots: int | str, slot_len: int, attention: str = "sdpa"):
        """`model` as loaded (PEFT-wrapped when adapters are attached unmerged). `slots`: cache slots, or
        "auto" (kv_cache.auto_slots: as many as the device holds). `attention` is decode's: "sdpa" reads
        the same context columns for every row, "flex" only the KV blocks each row needs."""
        if attention not in DECODE_ATTENTION:
            raise ValueError(f"decode attention {attention!r}: choose one of {', '.join(DECODE_ATTENTION)}")
        self.attention = attention
        self.wiring = wire(model, adapters)
        self.inner, self.lm_head = self.wiring.inner, self.wiring.lm_head
        self.layers, self.tables, self.dims = self.wiring.layers, self.wiring.tables, self.wiring.dims
        self.device, self.dtype = self.wiring.device, self.wiring.dtype
        self.decode_layer, self.qkv, self.finish_layer = decode_layer, qkv, finish_layer
        _, kv_heads, head_dim, _ = self.dims
        if slots == "auto":
            slots = auto_slots(len(self.layers), kv_heads, head_dim, self.dtype, self.device, slot_len)
        self.cache = KVCache(len(self.layers), slots, slot_len, kv_heads, head_dim, self.dtype, self.device)

    # -- the layers ------------------------------------------------------------------------------

    def _layers(self, h, positions, adapter_index, attend) -> torch.Tensor:
        """h: [rows, tokens, hidden]; positions: [rows, tokens];
        attend(layer index, q, k, v) -> [rows, tokens, heads*dim]."""
        cos, sin = self.inner.rotary_emb(h, positions)
        for i, (layer, tables) in enumerate(zip(self.layers, self.tables, strict=True)):
            q, k, v = self.qkv(layer, tables, layer.input_layernorm(h), adapter_index, cos, sin, self.dims)
            h = self.finish_layer(layer, tables, h, attend(i, q, k, v), adapter_index)
        return self.inner.norm(h)

    def _logits(self, last: torch.Tensor, pad_rows: int | None) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab] float32; the lm_head matmul runs over pad_rows rows if given."""
        rows = last.shape[0]
        if pad_rows is not None and pad_rows > rows:
            last = torch.cat([last, last.new_zeros(pad_rows - rows, last.shape[1])])
        return self.lm_head(last)[:rows].float()

    def _padding(self, q: torch.Tensor, rows: int) -> torch.Tensor:
        """Attention output for `rows` padding tokens: zeros [rows, heads, dim]."""
        return q.new_zeros(rows, self.dims.heads, self.dims.head_dim)

    # -- prefill ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[list[int]],
        first_slot: int,
        adapter_index: list[int],
        pad_tokens: int | None = None,
        pad_rows: int | None = None,
    ) -> torch.Tensor:
        """Write the prompts' keys/values into slots first_slot.. and return each prompt's last-token
        logits [prompts, vocab] (float32).

        The prompts run packed as one stream of tokens (each token a row of the matmuls), padded to
        pad_tokens; attention is causal within each prompt only. With a fixed pad_tokens every
        prompt gets the same numbers whatever it is packed with.
        """
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            # A 0-token prompt has no last token: its "last-token logits" would be the previous prompt's.
            raise ValueError(f"prefill needs prompts of at least one token, got lengths {lengths}")
        total = sum(lengths)
        self.cache.reserve(max(lengths))
        width = max(total, pad_tokens or 0)
        ids = torch.zeros(width, dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        token_adapter = torch.full((width,), -1, dtype=torch.long)
        token_slot = torch.zeros(total, dtype=torch.long)
        starts, offset = [], 0
        for j, (prompt, n, a) in enumerate(zip(prompts, lengths, adapter_index, strict=True)):
            ids[offset : offset + n] = torch.tensor(prompt, dtype=torch.long)
            positions[offset : offset + n] = torch.arange(n)
            token_adapter[offset : offset + n] = a
            token_slot[offset : offset + n] = first_slot + j
            starts.append(offset)
            offset += n
        ids, positions, token_adapter, token_slot = (
            t.to(self.device) for t in (ids, positions, token_adapter, token_slot)
        )

        packed = packed_attention(self.device, self.dtype)
        if packed:
            bounds = torch.tensor([*starts, total], dtype=torch.int32).to(self.device)

        def attend(layer: int, q, k, v):  # q: [width, heads, 1, dim]; k, v: [width, kv_heads, 1, dim]
            q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
            self.cache.keys[layer][token_slot, :, positions[:total]] = k[:total]
            self.cache.values[layer][token_slot, :, positions[:total]] = v[:total]
            if packed:  # every prompt alone (its own causal attention), all in one kernel
                parts = [packed_causal(q[:total], k[:total], v[:total], bounds, max(lengths), self.dims.scale)]
            else:
                parts = per_prompt_causal(q, k, v, starts, lengths, self.dims.scale)
            if width > total:
                parts.append(self._padding(q, width - total))
            return torch.cat(parts).reshape(width, 1, -1)

        h = self.inner.embed_tokens(ids)[:, None, :]
        h = self._layers(h, positions[:, None], token_adapter, attend)
        last = h[torch.tensor([s + n - 1 for s, n in zip(starts, lengths, strict=True)], device=self.device), 0]
        return self._logits(last, pad_rows)

    @torch.inference_mode()
    def prefill_chunk(
        self,
        ids: list[int],
        slot: int,
        start: int,
        adapter: int,
        pad_tokens: int | None = None,
        pad_rows: int | None = None,
    ) -> torch.Tensor:
        """Prefill one chunk of a long prompt: its tokens start..start+len(ids)-1 go into cache slot
        `slot` after the `start` tokens already there; returns the chunk's last-token logits [1, vocab].

        The chunk attends causally to itself and to the cached tokens before it (attention.chunk_attention,
        on CUDA too). Chunk boundaries depend on the prompt alone, so a prompt gets the same numbers
        whatever runs beside it.
        """
        n = len(ids)
        if n == 0:
            raise ValueError("prefill needs prompts of at least one token, got an empty chunk")
        columns = start + n
        self.cache.reserve(columns)
        width = max(n, pad_tokens or 0)
        tokens = torch.zeros(width, dtype=torch.long)
        tokens[:n] = torch.tensor(ids, dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        positions[:n] = torch.arange(start, columns)
        token_adapter = torch.full((width,), -1, dtype=torch.long)
        token_adapter[:n] = adapter
        tokens, positions, token_adapter = (t.to(self.device) for t in (tokens, positions, token_adapter))
        visible = torch.arange(columns, device=self.device)[None, :] <= positions[:n, None]  # [n, columns]

        def attend(layer: int, q, k, v):  # q: [width, heads, 1, dim]; k, v: [width, kv_heads, 1, dim]
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            keys[slot, :, start:columns] = k[:n, :, 0].transpose(0, 1)
            values[slot, :, start:columns] = v[:n, :, 0].transpose(0, 1)
            o = chunk_attention(q[:n], keys, values, slot, columns, visible, self.dims.scale)  # [n, heads, dim]
            if width > n:
                o = torch.cat([o, self._padding(o, width - n)])
            return o.reshape(width, 1, -1)

        h = self.inner.embed_tokens(tokens)[:, None, :]
        h = self._layers(h, positions[:, None], token_adapter, attend)
        return self._logits(h[n - 1 : n, 0], pad_rows)

    # -- decode ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(
        self, ids: torch.Tensor, positions: torch.Tensor, adapter_index: torch.Tensor, rows: int, context: int
    ) -> torch.Tensor:
        """One token for each of slots 0..rows-1: ids/positions/adapter_index are [gemm_rows] (>= rows;
        the extra rows are padding whose results are dropped); SDPA attention reads `context` cache
        columns, flex each row's own. Returns [gemm_rows, vocab] float32 logits. Runs eagerly or inside
        a CUDA graph."""
        slot = torch.arange(rows, device=self.device)
        if self.attention == "flex":
            mask = flex_mask(positions[:rows], self.cache.slots, self.cache.capacity)
        else:
            mask = (torch.arange(context, device=self.device)[None, :] <= positions[:rows, None])[:, None, None, :]
        h = self.inner.embed_tokens(ids)[:, None, :]
        cos, sin = self.inner.rotary_emb(h, positions[:, None])
        step = DecodeRows(cos, sin, adapter_index, slot, positions, mask)
        cache = self.cache
        for layer, tables, keys, values in zip(self.layers, self.tables, cache.keys, cache.values, strict=True):
            h = self.decode_layer(layer, tables, h, step, keys, values, self.dims)
        return self.lm_head(self.inner.norm(h)[:, 0]).float()

    def compile(self) -> None:
        """Use torch.compile'd layer pieces (fused elementwise kernels; compiled once for all layers):
        the whole decode layer, and prefill's parts around its per-prompt attention."""
        self.decode_layer = torch.compile(decode_layer, dynamic=True)
        self.qkv = torch.compile(qkv, dynamic=True)
        self.finish_layer = torch.compile(finish_layer, dynamic=True)
