"""The slot KV cache: `slots` sequences x `slot_len` tokens per layer, preallocated.

The sequence in slot i keeps its keys and values at positions 0..n-1 of row i of every layer's
tensors ([slots, kv_heads, columns, head_dim]), so each sequence has its own positions and nothing
is reshaped when sequences join or leave: a finished sequence's slot is refilled by moving another
sequence into it (`move`). Which request is in which slot is the scheduler's business (scheduler.py).
"""

from __future__ import annotations

import torch

from ..model import ModelLoadError

# CPU: the cache starts this many columns wide and grows with the longest sequence (see KVCache).
CPU_START_COLUMNS = 256
# engine.max_batch_size=auto (auto_slots): at most this many slots (the largest measured, BENCHMARKS.md,
# "The batch job's start-up"), a power of two (the decode steps' buckets are), and this share of the
# card kept free for activations, CUDA graphs and the allocator; on CPU the setting's default.
AUTO_MAX_SLOTS = 512
AUTO_HEADROOM = 0.10
AUTO_CPU_SLOTS = 32


def slot_bytes(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, slot_len: int) -> int:
    """Bytes of one sequence's keys and values over all layers, slot_len tokens long."""
    return 2 * layers * kv_heads * head_dim * dtype.itemsize * slot_len


def fit_slots(free: int, total: int, per_slot: int) -> int:
    """The most slots, a power of two up to AUTO_MAX_SLOTS, whose cache fits in `free` bytes less
    AUTO_HEADROOM of the card's `total`; 0 when not even one does."""
    room = free - AUTO_HEADROOM * total
    fits = int(room // per_slot) if room > 0 else 0
    return min(AUTO_MAX_SLOTS, 1 << (fits.bit_length() - 1)) if fits else 0


def auto_slots(
    layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, slot_len: int
) -> int:
    """engine.max_batch_size=auto for a cache of this shape, next to a model already on `device`;
    ModelLoadError when not one slot fits."""
    if device.type != "cuda":
        return AUTO_CPU_SLOTS
    per_slot = slot_bytes(layers, kv_heads, head_dim, dtype, slot_len)
    free, total = torch.cuda.mem_get_info(device)
    slots = fit_slots(free, total, per_slot)
    if not slots:
        raise ModelLoadError(
            f"max_batch_size=auto: not one sequence of {slot_len} tokens ({per_slot / 2**30:.2f} GiB of KV cache) "
            f"fits in the {free / 2**30:.1f} GiB left free next to the model, less {AUTO_HEADROOM:.0%} of the "
            "card: lower max_context"
        )
    return slots


class KVCache:
    def __init__(
        self,
        layers: int,
        slots: int,
        slot_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        """Allocate the cache; ModelLoadError (saying what to lower) when it does not fit."""
        self.layers, self.slots, self.slot_len = layers, slots, slot_len
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, device
        # On CUDA the whole cache exists from the start (captured graphs hold its address); on CPU it
        # grows with the longest sequence, so a large max_context costs memory only when used.
        self.capacity = slot_len if device.type == "cuda" else min(CPU_START_COLUMNS, slot_len)
        try:
            self.keys, self.values = self._allocate(self.capacity), self._allocate(self.capacity)
        except torch.OutOfMemoryError:
            raise ModelLoadError(self.out_of_memory_message()) from None

    def out_of_memory_message(self) -> str:
        """What the whole cache needs, and what to lower when that is more than the device has free."""
        gib = slot_bytes(self.layers, self.kv_heads, self.head_dim, self.dtype, self.slot_len) * self.slots / 2**30
        return (
            f"the KV cache for {self.slots} sequences x {self.slot_len} tokens needs {gib:.1f} GiB, more than is "
            "free next to the model: lower max_batch_size or max_context"
        )

    def _allocate(self, columns: int) -> list[torch.Tensor]:
        shape = (self.slots, self.kv_heads, columns, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]

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

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached tokens of slot `source` into slot `target`."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
