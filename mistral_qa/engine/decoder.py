"""The model's forward pass written out over a slot KV cache, for Llama/Mistral-family models.

The cache is preallocated: `slots` sequences x `slot_len` tokens per layer. The sequence in slot i
keeps its keys and values at positions 0..n-1 of row i, so every sequence has its own position and
a decode step is one forward over rows 0..rows-1 whatever their lengths: no padding columns, no
reshaping of the cache when sequences join or leave (a finished sequence's slot is refilled by
moving the last one into it).

It uses the model's own modules (embedding, norms, projections, rotary embedding, MLP activation)
and only re-does the wiring, so numbers match the transformers forward. LoRA adapters are applied
per row (lora_rows.py), so one step can mix adapters and the bare base.

Shapes can be padded for batch invariance (see `prefill` and `decode`): on CUDA every decode runs
the matmuls over a fixed number of rows, so a sequence gets the same numbers alone or in a full
batch, and greedy answers do not depend on what else is running.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..model import ModelLoadError
from .attention import flex_mask, packed_attention, packed_causal
from .lora_rows import LoraRows
from .support import check_supported

PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
DECODE_ATTENTION = ("sdpa", "flex")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [rows, heads, tokens, dim]; cos/sin: [rows, tokens, dim] (as transformers applies them)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _lora(out: torch.Tensor, table, x: torch.Tensor, adapter_index: torch.Tensor) -> torch.Tensor:
    """out plus each row's own LoRA delta of x, when the projection has adapters (see lora_rows.py)."""
    if table is None:
        return out
    a, b, owner = table
    keep = (adapter_index[:, None] == owner[None, :]).to(a.dtype)  # [rows, sum of ranks]
    low = (x.to(a.dtype) @ a.T) * keep[:, None, :]
    return out + (low @ b.T).to(out.dtype)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def project(module: nn.Module, table, x: torch.Tensor, adapter_index: torch.Tensor) -> torch.Tensor:
    return _lora(_base(module)(x), table, x, adapter_index)


def _projections(x, fused, parts, tables, adapter_index, modules) -> list[torch.Tensor]:
    """Several projections of the same x: one matmul over their concatenated weights when fused."""
    if fused is None:
        return [project(m, tables[n], x, adapter_index) for n, m in zip(parts, modules, strict=True)]
    outs = F.linear(x, fused).split([m.weight.shape[0] for m in map(_base, modules)], dim=-1)
    return [_lora(o, tables[n], x, adapter_index) for o, n in zip(outs, parts, strict=True)]


def fuse_weights(modules: list[nn.Module]) -> torch.Tensor | None:
    """One weight matrix for projections that read the same input (plain bias-free Linear layers),
    the modules' own weights becoming views into it (no extra memory); None when they don't fit."""
    bases = [_base(m) for m in modules]
    if not all(type(b) is nn.Linear and b.bias is None for b in bases):
        return None
    fused = torch.cat([b.weight.data for b in bases])
    start = 0
    for b in bases:
        rows = b.weight.shape[0]
        b.weight.data = fused[start : start + rows]
        start += rows
    return fused


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def qkv(layer, tables, x, adapter_index, cos, sin, dims):
    """Queries [rows, heads, tokens, dim] and keys, values [rows, kv_heads, tokens, dim], rotated."""
    heads, kv_heads, head_dim, _ = dims
    rows, tokens = x.shape[:2]
    attn = layer.self_attn
    q, k, v = _projections(x, tables["qkv"], QKV, tables, adapter_index, [attn.q_proj, attn.k_proj, attn.v_proj])
    q = q.reshape(rows, tokens, heads, head_dim).transpose(1, 2)
    k = k.reshape(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def finish_layer(layer, tables, h, attended, adapter_index):
    """Output projection, residual, MLP, residual."""
    h = h + project(layer.self_attn.o_proj, tables["o_proj"], attended, adapter_index)
    x = layer.post_attention_layernorm(h)
    mlp = layer.mlp
    gate, up = _projections(x, tables["gate_up"], GATE_UP, tables, adapter_index, [mlp.gate_proj, mlp.up_proj])
    return h + project(mlp.down_proj, tables["down_proj"], mlp.act_fn(gate) * up, adapter_index)


def decode_layer(layer, tables, h, cos, sin, adapter_index, keys, values, slot, positions, mask, dims):
    """One layer for one new token per row. Rows 0..len(slot)-1 are cache slots: their keys/values
    are written at their positions; other rows are padding. `mask` is SDPA's boolean mask over the
    first mask.shape[-1] cache columns, or a flex BlockMask over the whole cache (flex_mask)."""
    heads, kv_heads, head_dim, scale = dims
    rows = slot.shape[0]
    q, k, v = qkv(layer, tables, layer.input_layernorm(h), adapter_index, cos, sin, dims)
    keys[slot, :, positions[:rows]] = k[:rows, :, 0]
    values[slot, :, positions[:rows]] = v[:rows, :, 0]
    if isinstance(mask, BlockMask):
        # Over all cache slots (those past `rows` read no blocks), the cache's shape made constant under
        # torch.compile(dynamic=True): inductor's flex-decoding kernel needs a static batch (else it
        # falls back to its general kernel) and skips bounds checks when the length is whole blocks.
        # One compiled graph still serves every bucket of rows (on CUDA the cache never grows).
        torch._dynamo.mark_static(keys, 0)
        torch._dynamo.mark_static(keys, 2)
        everyone = q.new_zeros(keys.shape[0], *q.shape[1:])
        everyone[:rows] = q[:rows]
        o = flex_attention(everyone, keys, values, block_mask=mask, scale=scale, enable_gqa=True)[:rows]
    else:
        context = mask.shape[-1]
        # One new token per row: the query heads sharing a KV head ride as that head's "tokens".
        qg = q[:rows].reshape(rows, kv_heads, heads // kv_heads, head_dim)
        o = F.scaled_dot_product_attention(
            qg, keys[:rows, :, :context], values[:rows, :, :context], attn_mask=mask, scale=scale
        )
    attended = q.new_zeros(q.shape[0], 1, heads * head_dim)
    attended[:rows, 0] = o.reshape(rows, -1)
    return finish_layer(layer, tables, h, attended, adapter_index)


class SlotDecoder:
    def __init__(self, model: nn.Module, adapters: list[str], slots: int, slot_len: int, attention: str = "sdpa"):
        """`model` as loaded (PEFT-wrapped when adapters are attached unmerged). `attention` is decode's:
        "sdpa" reads the same context columns for every row, "flex" only the KV blocks each row needs."""
        if attention not in DECODE_ATTENTION:
            raise ValueError(f"decode attention {attention!r}: choose one of {', '.join(DECODE_ATTENTION)}")
        self.attention = attention
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        check_supported(base)
        self.inner, self.lm_head = base.model, base.lm_head
        self.layers = list(self.inner.layers)
        cfg = base.config
        attn = self.layers[0].self_attn
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        weight = self.inner.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        lora = LoraRows(model, adapters, self.dtype)
        self.tables = [lora.layer_tables(layer) for layer in self.layers]
        for layer, tables in zip(self.layers, self.tables, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            tables["qkv"] = fuse_weights([attn.q_proj, attn.k_proj, attn.v_proj])
            tables["gate_up"] = fuse_weights([mlp.gate_proj, mlp.up_proj])
        self.dims = (self.heads, self.kv_heads, self.head_dim, self.scale)
        self.decode_layer, self.qkv, self.finish_layer = decode_layer, qkv, finish_layer
        self.slots, self.slot_len = slots, slot_len
        # On CUDA the whole cache exists from the start (captured graphs hold its address); on CPU it
        # grows with the longest sequence, so a large max_context costs memory only when used.
        self.capacity = slot_len if self.device.type == "cuda" else min(256, slot_len)
        try:
            self.keys, self.values = self._allocate(self.capacity), self._allocate(self.capacity)
        except torch.OutOfMemoryError:
            per_token = 2 * len(self.layers) * self.kv_heads * self.head_dim * weight.element_size()
            gib = per_token * slots * slot_len / 2**30
            raise ModelLoadError(
                f"the KV cache for {slots} sequences x {slot_len} tokens needs {gib:.1f} GiB, more than is free "
                "next to the model: lower max_batch_size or max_context"
            ) from None

    def _allocate(self, columns: int) -> list[torch.Tensor]:
        shape = (self.slots, self.kv_heads, columns, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]

    def reserve(self, length: int) -> None:
        """Make room for sequences of `length` tokens (<= slot_len)."""
        if length <= self.capacity:
            return
        columns = min(self.slot_len, max(length, 2 * self.capacity))
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                new = old.new_zeros(self.slots, self.kv_heads, columns, self.head_dim)
                new[:, :, : self.capacity] = old
                cache[i] = new
        self.capacity = columns

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
        self.reserve(max(lengths))
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
            self.keys[layer][token_slot, :, positions[:total]] = k[:total]
            self.values[layer][token_slot, :, positions[:total]] = v[:total]
            if packed:  # every prompt alone (its own causal attention), all in one kernel
                parts = [packed_causal(q[:total], k[:total], v[:total], bounds, max(lengths), self.scale)]
            else:
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
                # Each prompt attends alone (the same numbers whatever it is packed with), never with
                # cuDNN's kernels: PyTorch's first choice on Hopper, they build a plan per prompt length.
                with sdpa_kernel(PREFILL_ATTENTION):
                    parts = [
                        F.scaled_dot_product_attention(
                            q[None, :, a : a + n],
                            k[None, :, a : a + n],
                            v[None, :, a : a + n],
                            is_causal=True,
                            scale=self.scale,
                            enable_gqa=True,
                        )[0].transpose(0, 1)
                        for a, n in zip(starts, lengths, strict=True)
                    ]
            if width > total:
                parts.append(q.new_zeros(width - total, self.heads, self.head_dim))
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

        The chunk attends causally to itself and to the cached tokens before it: SDPA over the slot's
        first start+n columns with an offset causal mask (on CUDA too: one call per chunk per layer,
        so no varlen kernel is needed). Chunk boundaries depend on the prompt alone, so a prompt gets
        the same numbers whatever runs beside it.
        """
        n = len(ids)
        if n == 0:
            raise ValueError("prefill needs prompts of at least one token, got an empty chunk")
        columns = start + n
        self.reserve(columns)
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
            keys, values = self.keys[layer], self.values[layer]
            keys[slot, :, start:columns] = k[:n, :, 0].transpose(0, 1)
            values[slot, :, start:columns] = v[:n, :, 0].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q[None, :n, :, 0].transpose(1, 2),
                keys[slot : slot + 1, :, :columns],
                values[slot : slot + 1, :, :columns],
                attn_mask=visible,
                scale=self.scale,
                enable_gqa=True,
            )[0].transpose(0, 1)  # [n, heads, dim]
            if width > n:
                o = torch.cat([o, o.new_zeros(width - n, self.heads, self.head_dim)])
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
            mask = flex_mask(positions[:rows], self.slots, self.capacity)
        else:
            mask = (torch.arange(context, device=self.device)[None, :] <= positions[:rows, None])[:, None, None, :]
        h = self.inner.embed_tokens(ids)[:, None, :]
        cos, sin = self.inner.rotary_emb(h, positions[:, None])
        for layer, tables, keys, values in zip(self.layers, self.tables, self.keys, self.values, strict=True):
            h = self.decode_layer(
                layer, tables, h, cos, sin, adapter_index, keys, values, slot, positions, mask, self.dims
            )
        return self.lm_head(self.inner.norm(h)[:, 0]).float()

    def compile(self) -> None:
        """Use torch.compile'd layer pieces (fused elementwise kernels; compiled once for all layers):
        the whole decode layer, and prefill's parts around its per-prompt attention."""
        self.decode_layer = torch.compile(decode_layer, dynamic=True)
        self.qkv = torch.compile(qkv, dynamic=True)
        self.finish_layer = torch.compile(finish_layer, dynamic=True)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached tokens of slot `source` into slot `target`."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
