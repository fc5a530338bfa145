"""The engine's attention variants, over the slot KV cache (kv_cache.py):

- decode, one new token per row: SDPA over the first `context` columns of every row's slot
  (`sdpa_decode`), or FlexAttention with a per-row block mask, so each row reads only the KV blocks
  it holds (`flex_mask`, `flex_decode`);
- prefill of a pack of prompts, each causal within itself: one variable-length flash-attention call
  on CUDA (`packed_attention`, `packed_causal`), else one SDPA call per prompt (`per_prompt_causal`);
- a chunk of a long prompt: SDPA over its slot's cached tokens and itself (`chunk_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# Prefill's SDPA kernels, never cuDNN's: PyTorch's first choice on Hopper, they build a plan per prompt length.
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Flex decode's kernel settings on CUDA for a cache of at least FLEX_OPTIONS_MIN_SLOTS slots: three
# pipelined load stages and four warps instead of inductor's one stage and two on sm_90 (BLOCK_N stays
# 64). On an H200 (python -m benchmarks.flex_decode, BENCHMARKS.md) they cut a full 512-row step's
# attention by ~6% and cost one row in a 512-slot cache ~0.17 ms a step; in a 64-slot cache they cost
# a full 64-row step ~12%, so smaller caches (serving's) keep inductor's own.
FLEX_DECODE_OPTIONS = {"num_stages": 3, "num_warps": 4}
FLEX_OPTIONS_MIN_SLOTS = 256


# Flex block mask: cache columns per KV block, and the size of its one query block (inductor's decoding
# kernel needs a multiple of its 16-row tile there).
FLEX_BLOCK = 128


def flex_mask(positions: torch.Tensor, slots: int, columns: int) -> BlockMask:
    """Flex attention's mask over all `slots` cache rows of `columns` columns: row i < len(positions)
    attends to columns 0..positions[i], reading only the KV blocks that hold them; the other slots
    read nothing. Device tensor ops only, so a CUDA graph replays it with new positions."""
    seen = F.pad(positions, (0, slots - positions.shape[0]), value=-1)
    blocks = -(-columns // FLEX_BLOCK)
    used = (seen // FLEX_BLOCK + 1).to(torch.int32)[:, None, None]  # 0 for the -1s
    order = torch.arange(blocks, dtype=torch.int32, device=seen.device).repeat(slots, 1, 1, 1)

    def up_to_position(b, h, q_idx, kv_idx):
        return kv_idx <= seen[b]

    for fixed in (seen, used, order):  # constant sizes for torch.compile(dynamic=True): see decode_layer
        torch._dynamo.mark_static(fixed)
    return BlockMask.from_kv_blocks(
        used, order, BLOCK_SIZE=FLEX_BLOCK, mask_mod=up_to_position, seq_lengths=(1, columns), compute_q_blocks=False
    )


def packed_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prefill runs all packed prompts through one variable-length flash-attention call
    (CUDA, half precision, Ampere or newer) instead of one attention call per prompt: a pack of ~20
    short prompts otherwise costs 20 kernel launches per layer and leaves the GPU mostly idle."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def packed_causal(q, k, v, bounds: torch.Tensor, longest: int, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]; prompt i is tokens bounds[i]..bounds[i+1]
    (int32 on the device). Causal attention within each prompt, from its own first token, so a
    prompt gets the numbers it gets alone whatever it is packed with. The aten op directly: newer
    torch wraps it as torch.nn.attention.varlen.varlen_attn, which older supported versions lack."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, bounds, bounds, longest, longest, 0.0, True, False, scale=scale
    )[0]


def sdpa_decode(q, keys, values, mask: torch.Tensor, rows: int, dims) -> torch.Tensor:
    """q: [>= rows, heads, 1, dim]; keys, values: one layer's cache; mask: [rows, 1, 1, context]
    boolean over the first `context` cache columns. Returns [rows, kv_heads, heads per kv head, dim]."""
    heads, kv_heads, head_dim, scale = dims
    context = mask.shape[-1]
    # One new token per row: the query heads sharing a KV head ride as that head's "tokens".
    qg = q[:rows].reshape(rows, kv_heads, heads // kv_heads, head_dim)
    return F.scaled_dot_product_attention(
        qg, keys[:rows, :, :context], values[:rows, :, :context], attn_mask=mask, scale=scale
    )


def flex_decode(
    q, keys, values, mask: BlockMask, rows: int, scale: float, kernel_options: dict | None | str = "auto"
) -> torch.Tensor:
    """q: [>= rows, heads, 1, dim]; keys, values: one layer's whole cache; mask: flex_mask's.
    kernel_options: inductor's decoding-kernel settings on CUDA; "auto": FLEX_DECODE_OPTIONS for a cache
    of FLEX_OPTIONS_MIN_SLOTS slots or more, else None, inductor's own (benchmarks/flex_decode.py compares
    them). Returns [rows, heads, 1, dim]."""
    # Over all cache slots (those past `rows` read no blocks), the cache's shape made constant under
    # torch.compile(dynamic=True): inductor's flex-decoding kernel needs a static batch (else it
    # falls back to its general kernel) and skips bounds checks when the length is whole blocks.
    # One compiled graph still serves every bucket of rows (on CUDA the cache never grows).
    torch._dynamo.mark_static(keys, 0)
    torch._dynamo.mark_static(keys, 2)
    everyone = q.new_zeros(keys.shape[0], *q.shape[1:])
    everyone[:rows] = q[:rows]
    if kernel_options == "auto":
        kernel_options = FLEX_DECODE_OPTIONS if keys.shape[0] >= FLEX_OPTIONS_MIN_SLOTS else None
    options = kernel_options if q.device.type == "cuda" else None
    return flex_attention(
        everyone, keys, values, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=options
    )[:rows]


def per_prompt_causal(q, k, v, starts: list[int], lengths: list[int], scale: float) -> list[torch.Tensor]:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]; prompt i is tokens starts[i]..+lengths[i].
    Each prompt attends alone (the same numbers whatever it is packed with), one SDPA call each.
    Returns each prompt's [length, heads, dim]."""
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    with sdpa_kernel(PREFILL_ATTENTION):
        return [
            F.scaled_dot_product_attention(
                q[None, :, a : a + n],
                k[None, :, a : a + n],
                v[None, :, a : a + n],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )[0].transpose(0, 1)
            for a, n in zip(starts, lengths, strict=True)
        ]


def chunk_attention(q, keys, values, slot: int, columns: int, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """A chunk of n tokens (q: [n, heads, 1, dim]) attending to the first `columns` cached tokens of
    `slot` (its own keys already written there) through `visible` [n, columns], the offset causal
    mask. One SDPA call: no varlen kernel is needed. Returns [n, heads, dim]."""
    return F.scaled_dot_product_attention(
        q[None, :, :, 0].transpose(1, 2),
        keys[slot : slot + 1, :, :columns],
        values[slot : slot + 1, :, :columns],
        attn_mask=visible,
        scale=scale,
        enable_gqa=True,
    )[0].transpose(0, 1)
