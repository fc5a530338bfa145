"""Decode steps: exact shapes, eagerly, on CPU; on CUDA padded to a few bucketed shapes, each
captured once as a CUDA graph and replayed (one launch per step instead of hundreds of kernels).

The bucketing keeps answers independent of what else runs, up to GEMM_ROWS rows: the matmuls always
cover at least GEMM_ROWS rows (decode is bound by reading the weights, so up to that many rows cost
the same as one), so a row's numbers come from the same kernels alone or in a batch of up to
GEMM_ROWS; attention is per row, so its padding (rows and context columns) does not change a row's
result. A step of more rows runs larger matmuls, whose kernels cuBLAS picks by size: there a row's
numbers can differ in rounding from the same row alone.
"""

from __future__ import annotations

import time

import torch

from .decoder import SlotDecoder
from .stats import EngineStats

GEMM_ROWS = 64  # CUDA: least rows in every decode matmul
# CUDA: least attention rows. torch.compile specialises a size of 1, so a 1-row step would compile the
# decode layer a second time (tens of seconds) the first time a second sequence joins.
MIN_ATTENTION_ROWS = 2
MIN_CONTEXT = 128  # CUDA: least cache columns attention reads
# Default prefill pack: shorter prompts run packed (on CUDA padded to this many tokens), longer ones alone.
PREFILL_TOKENS = 1024


def host_longs(values: list[int], device: torch.device) -> torch.Tensor:
    """A host tensor to copy to `device` without waiting: in pinned memory for a GPU (a copy from
    pageable memory may wait for the work queued before it; the pinned block is not reused until the
    copy is done)."""
    return torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda")


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class DecodeSteps:
    def __init__(
        self,
        decoder: SlotDecoder,
        compile: bool = False,
        use_graphs: bool | None = None,
        padded: bool | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
        stats: EngineStats | None = None,
    ):
        """use_graphs and padded (bucketed shapes) default to whether the decoder is on CUDA. `stats`
        counts the CUDA graphs recorded and their time."""
        self.decoder = decoder
        self.stats = stats or EngineStats()
        self.prefill_tokens = prefill_tokens
        cuda = decoder.device.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else use_graphs
        self.padded = cuda if padded is None else padded
        if compile:
            decoder.compile()
        largest = self._gemm_rows(decoder.cache.slots)
        self.ids = torch.zeros(largest, dtype=torch.long, device=decoder.device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=decoder.device)
        self.adapters = torch.full((largest,), -1, dtype=torch.long, device=decoder.device)
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # -- shapes ----------------------------------------------------------------------------------

    def _gemm_rows(self, n: int) -> int:
        return max(GEMM_ROWS, _pow2(n)) if self.padded else n

    def shape(self, n: int, longest: int) -> tuple[int, int, int]:
        """(matmul rows, attention rows, context columns) for n sequences, the longest `longest` tokens."""
        if not self.padded:
            return n, n, longest
        context = min(max(MIN_CONTEXT, _pow2(longest)), self.decoder.cache.slot_len)
        return self._gemm_rows(n), min(max(MIN_ATTENTION_ROWS, _pow2(n)), self.decoder.cache.slots), context

    def prefill_padding(self, total_tokens: int) -> tuple[int | None, int | None]:
        """(pad_tokens, pad_rows) for a prefill forward of total_tokens packed prompt tokens."""
        if not self.padded:
            return None, None
        return (self.prefill_tokens if total_tokens <= self.prefill_tokens else None), GEMM_ROWS

    # -- running ---------------------------------------------------------------------------------

    def __call__(self, ids: torch.Tensor, positions: list[int], adapters: list[int]) -> torch.Tensor:
        """Logits [n, vocab] (float32) of one decode step for slots 0..n-1; ids: [n] token ids, on any
        device (on the GPU they may still be in the making: the copy queues behind them)."""
        n = len(positions)
        rows, attn_rows, context = self.shape(n, max(positions) + 1)
        self.decoder.cache.reserve(context)
        self.ids[:rows].zero_()
        self.positions[:rows].zero_()
        self.adapters[:rows].fill_(-1)
        self.ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(host_longs(positions, self.decoder.device), non_blocking=True)
        self.adapters[:n].copy_(host_longs(adapters, self.decoder.device), non_blocking=True)
        key = (rows, attn_rows, context)
        if not self.use_graphs:
            logits = self.decoder.decode(
                self.ids[:rows], self.positions[:rows], self.adapters[:rows], attn_rows, context
            )
            return logits[:n]
        if key not in self.graphs:
            started = time.perf_counter()
            self.graphs[key] = self._capture(*key)
            self.stats.graph_captured(time.perf_counter() - started)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _capture(self, rows: int, attn_rows: int, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        args = (self.ids[:rows], self.positions[:rows], self.adapters[:rows], attn_rows, context)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs (kernel selection, workspaces); they rewrite the same cache values
            for _ in range(2):
                self.decoder.decode(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.decoder.decode(*args)
        self._pool = graph.pool()
        return graph, logits
