"""The model's wiring for the families in support.py (Llama, Mistral, Qwen2: one layout), re-done
over the model's own modules (embedding, norms, projections, rotary embedding, MLP activation), so
numbers match the transformers forward while attention reads the engine's slot cache.

LoRA adapters are applied per row (lora_rows.py), so one step can mix adapters and the bare base;
projections that read the same input (q/k/v, gate/up) run as one matmul over fused weights.
`qkv`, `finish_layer` and `decode_layer` are what torch.compile compiles (decoder.compile): they take
only tensors, modules and the NamedTuples below, which dynamo traces like plain tuples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from .attention import flex_decode, sdpa_decode
from .lora_rows import LoraRows, LoraTable, LoraTables
from .support import check_supported


class LayerDims(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int
    scale: float  # attention's softmax scale


class LayerTables(NamedTuple):
    """What a decoder layer runs besides its modules: its LoRA tables, and its fused weights."""

    lora: LoraTables
    qkv: torch.Tensor | None  # q/k/v weights as one matrix (None: not fusable, each runs alone)
    gate_up: torch.Tensor | None  # gate/up weights as one matrix


class DecodeRows(NamedTuple):
    """A decode step's inputs shared by every layer. Row i of the matmuls (i < len(slot)) is the
    sequence in cache slot slot[i]; the rows past len(slot) are padding."""

    cos: torch.Tensor  # rotary embedding at the rows' positions
    sin: torch.Tensor
    adapter_index: torch.Tensor  # [matmul rows]: each row's adapter, -1 the base
    slot: torch.Tensor  # [attention rows]: each row's cache slot
    positions: torch.Tensor  # [matmul rows]: where each row's new token goes in its slot
    mask: torch.Tensor | BlockMask  # SDPA's boolean mask over the first columns, or flex's block mask


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [rows, heads, tokens, dim]; cos/sin: [rows, tokens, dim] (as transformers applies them)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _lora(out: torch.Tensor, table: LoraTable | None, x: torch.Tensor, adapter_index: torch.Tensor) -> torch.Tensor:
    """out plus each row's own LoRA delta of x, when the projection has adapters (see lora_rows.py)."""
    if table is None:
        return out
    a, b, owner = table
    keep = (adapter_index[:, None] == owner[None, :]).to(a.dtype)  # [rows, sum of ranks]
    low = (x.to(a.dtype) @ a.T) * keep[:, None, :]
    return out + (low @ b.T).to(out.dtype)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def project(module: nn.Module, table: LoraTable | None, x: torch.Tensor, adapter_index: torch.Tensor) -> torch.Tensor:
    return _lora(_base(module)(x), table, x, adapter_index)


def _projections(x, fused, tables, adapter_index, modules) -> list[torch.Tensor]:
    """Several projections of the same x: one matmul over their concatenated weights when fused."""
    if fused is None:
        return [project(m, t, x, adapter_index) for t, m in zip(tables, modules, strict=True)]
    outs = F.linear(x, fused).split([m.weight.shape[0] for m in map(_base, modules)], dim=-1)
    return [_lora(o, t, x, adapter_index) for o, t in zip(outs, tables, strict=True)]


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


def qkv(layer, tables: LayerTables, x, adapter_index, cos, sin, dims: LayerDims):
    """Queries [rows, heads, tokens, dim] and keys, values [rows, kv_heads, tokens, dim], rotated."""
    heads, kv_heads, head_dim, _ = dims
    rows, tokens = x.shape[:2]
    attn, lora = layer.self_attn, tables.lora
    parts = (lora.q_proj, lora.k_proj, lora.v_proj)
    q, k, v = _projections(x, tables.qkv, parts, adapter_index, [attn.q_proj, attn.k_proj, attn.v_proj])
    q = q.reshape(rows, tokens, heads, head_dim).transpose(1, 2)
    k = k.reshape(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def finish_layer(layer, tables: LayerTables, h, attended, adapter_index):
    """Output projection, residual, MLP, residual."""
    lora = tables.lora
    h = h + project(layer.self_attn.o_proj, lora.o_proj, attended, adapter_index)
    x = layer.post_attention_layernorm(h)
    mlp = layer.mlp
    parts = (lora.gate_proj, lora.up_proj)
    gate, up = _projections(x, tables.gate_up, parts, adapter_index, [mlp.gate_proj, mlp.up_proj])
    return h + project(mlp.down_proj, lora.down_proj, mlp.act_fn(gate) * up, adapter_index)


def decode_layer(layer, tables: LayerTables, h, step: DecodeRows, keys, values, dims: LayerDims):
    """One layer for one new token per row. Rows 0..len(step.slot)-1 are cache slots: their
    keys/values are written at their positions; other rows are padding. `step.mask` is SDPA's
    boolean mask over the first mask.shape[-1] cache columns, or a flex BlockMask over the whole
    cache (attention.flex_mask)."""
    heads, _, head_dim, _ = dims
    slot, positions = step.slot, step.positions
    rows = slot.shape[0]
    q, k, v = qkv(layer, tables, layer.input_layernorm(h), step.adapter_index, step.cos, step.sin, dims)
    keys[slot, :, positions[:rows]] = k[:rows, :, 0]
    values[slot, :, positions[:rows]] = v[:rows, :, 0]
    if isinstance(step.mask, BlockMask):
        o = flex_decode(q, keys, values, step.mask, rows, dims.scale)
    else:
        o = sdpa_decode(q, keys, values, step.mask, rows, dims)
    attended = q.new_zeros(q.shape[0], 1, heads * head_dim)
    attended[:rows, 0] = o.reshape(rows, -1)
    return finish_layer(layer, tables, h, attended, step.adapter_index)


@dataclass
class ModelWiring:
    """A supported model taken apart: the modules the engine calls, each layer's tables, the dims."""

    inner: nn.Module  # embed_tokens, layers, norm, rotary_emb
    lm_head: nn.Module
    layers: list[nn.Module]
    tables: list[LayerTables]
    dims: LayerDims
    device: torch.device
    dtype: torch.dtype


def wire(model: nn.Module, adapters: list[str]) -> ModelWiring:
    """`model` as loaded (PEFT-wrapped when adapters are attached unmerged); ModelLoadError unless its
    family is listed in support.py. Fuses q/k/v and gate/up weights in place (views: no extra memory)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_supported(base)
    inner = base.model
    layers = list(inner.layers)
    cfg, attn = base.config, layers[0].self_attn
    dims = LayerDims(cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, attn.scaling)
    weight = inner.embed_tokens.weight
    lora = LoraRows(model, adapters, weight.dtype)
    tables = [
        LayerTables(
            lora.layer_tables(layer),
            fuse_weights([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
            fuse_weights([layer.mlp.gate_proj, layer.mlp.up_proj]),
        )
        for layer in layers
    ]
    return ModelWiring(inner, base.lm_head, layers, tables, dims, weight.device, weight.dtype)
