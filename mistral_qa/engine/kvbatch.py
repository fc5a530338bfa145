"""The tensors of a running batch and the three things done to them: prefill, decode one step,
and reshape (merge newcomers in, drop finished rows).

Rows are left-padded: every row's real tokens end at the last cache column, so one new token per
row per step appends one column. Position ids are per row (real tokens only), pads are masked.
Invariant: after prefill, merge and select, the first cache column holds some row's first token,
so the cache is never wider than the longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class KVBatch:
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns] long: 1 = real token, 0 = pad
    positions: torch.Tensor  # [rows] long: position id of the token fed at the next step
    next_ids: torch.Tensor  # [rows] long: that token

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def forward_last(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """Logits of the last position of every row, float32. logits_to_keep=1 matches `generate`
    (the lm_head sees the same single row, so greedy picks the same token bit for bit)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].float()


def prefill(model, prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[KVBatch, torch.Tensor]:
    """Run the prompts through the model; returns their batch (next_ids unset) and last logits."""
    ids, mask = left_pad(prompts, pad_id, device)
    position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = forward_last(model, ids, mask, position_ids, cache)
    return KVBatch(cache, mask, mask.sum(dim=-1), torch.zeros_like(mask[:, 0])), logits


def decode_step(model, batch: KVBatch) -> torch.Tensor:
    """Feed every row its next token; grows the cache by one column, returns [rows, vocab] logits."""
    mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=-1)
    logits = forward_last(model, batch.next_ids[:, None], mask, batch.positions[:, None], batch.cache)
    batch.mask = mask
    batch.positions = batch.positions + 1
    return logits


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [extra, 0]
    return F.pad(t, pad)


def merge(a: KVBatch, b: KVBatch) -> KVBatch:
    """Rows of `a` then rows of `b`, left-padded to the wider of the two."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    layers = [
        (
            torch.cat([_pad_left(ka, width, -2), _pad_left(kb, width, -2)]),
            torch.cat([_pad_left(va, width, -2), _pad_left(vb, width, -2)]),
        )
        for (ka, va), (kb, vb) in zip(_layers(a.cache), _layers(b.cache), strict=True)
    ]
    return KVBatch(
        DynamicCache(ddp_cache_data=layers),
        torch.cat([_pad_left(a.mask, width, 1), _pad_left(b.mask, width, 1)]),
        torch.cat([a.positions, b.positions]),
        torch.cat([a.next_ids, b.next_ids]),
    )


def select(batch: KVBatch, keep: list[int]) -> KVBatch:
    """Only the rows `keep`, without the leading columns that are now padding in every row."""
    index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    real_columns = mask.any(dim=0).nonzero()
    start = int(real_columns[0]) if len(real_columns) else mask.shape[1]
    layers = [
        (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
        for k, v in _layers(batch.cache)
    ]
    return KVBatch(
        DynamicCache(ddp_cache_data=layers),
        mask[:, start:],
        batch.positions.index_select(0, index),
        batch.next_ids.index_select(0, index),
    )
