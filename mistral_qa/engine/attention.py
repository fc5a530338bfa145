"""Attention pieces of the decoder that depend on the device: FlexAttention's block mask for decode
(each row reads only the KV blocks it holds), and the one-call variable-length flash attention that
prefill packs use on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

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
