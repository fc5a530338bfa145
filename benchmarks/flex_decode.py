"""Decode attention alone, one layer of the 7B shape over the engine's slot cache: FlexAttention's
decoding kernel with each of a few kernel settings (inductor's default first), at 1 and at a full
cache of rows, against SDPA's answer over the same columns.

    python -m benchmarks.flex_decode [--slots 512] [--slot-len 1024] [--context 320]

Each setting compiles the engine's own `flex_decode` (attention.py) as the decode layer does
(torch.compile, dynamic shapes), then, after 20 warm-up calls, captures 200 calls in a CUDA graph (as
the engine's decode steps are) and times its replay in CUDA events; the median of 5 replays is
reported per call, and x layers for a whole step. The cache holds random
fp16 keys and values; every row attends to `context` columns. GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from mistral_qa.engine.attention import flex_decode, flex_mask

# Inductor's choice on sm_90 (torch 2.11-2.13) is BLOCK_N 64, one stage, two warps: no load pipelining.
# The engine's for caches of 256 slots or more (attention.FLEX_DECODE_OPTIONS) is "stages 3, warps 4".
CANDIDATES = {
    "inductor default": None,
    "stages 2, warps 4": {"num_stages": 2, "num_warps": 4},
    "stages 3, warps 4": {"num_stages": 3, "num_warps": 4},
    "stages 3, warps 2": {"num_stages": 3, "num_warps": 2},
    "block_n 128, stages 2, warps 4": {"BLOCK_N": 128, "num_stages": 2, "num_warps": 4},
    "block_n 32, stages 4, warps 2": {"BLOCK_N": 32, "num_stages": 4, "num_warps": 2},
    "stages 3, warps 4, split 4": {"num_stages": 3, "num_warps": 4, "SPLIT_KV": 4},
    # Inductor splits a row's blocks over SMs only when the cache has few slots x KV heads (SPLIT_KV =
    # 2 x SMs // (slots x kv heads): 1 for 64 slots x 8 heads), so one row of a 64-slot cache runs 8 programs.
    "split 4": {"SPLIT_KV": 4},
    "block_n 128, stages 2, warps 4, split 2": {"BLOCK_N": 128, "num_stages": 2, "num_warps": 4, "SPLIT_KV": 2},
}


def timed_ms(call, calls: int = 200, warmup: int = 20, repeats: int = 5) -> float:
    """ms per call: `calls` calls captured in one CUDA graph (as the engine replays its decode steps,
    so a small call is timed by its kernels, not by launching them), replayed `repeats` times."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / calls)
    return statistics.median(runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--slot-len", type=int, default=1024)
    p.add_argument("--context", type=int, default=320, help="columns every row attends to")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=32, help="for the per-step figure")
    p.add_argument("--only", default=None, help="candidate names separated by | (default: all)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.flex_decode needs a CUDA GPU")
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.float16
    keys = torch.randn(a.slots, a.kv_heads, a.slot_len, a.head_dim, device=dev, dtype=dt)
    values = torch.randn_like(keys)
    scale = a.head_dim**-0.5
    names = a.only.split("|") if a.only else list(CANDIDATES)
    results = {}
    for name in names:
        options = CANDIDATES[name]
        torch._dynamo.reset()  # each setting compiles afresh (they share flex_decode's code object)
        compiled = torch.compile(flex_decode, dynamic=True)
        figures = {}
        for rows in sorted({1, a.slots}):
            gemm_rows = max(64, rows)
            q = torch.randn(gemm_rows, a.heads, 1, a.head_dim, device=dev, dtype=dt)
            positions = torch.full((rows,), a.context - 1, dtype=torch.long, device=dev)
            mask = flex_mask(positions, a.slots, a.slot_len)

            def call(q=q, mask=mask, rows=rows, compiled=compiled, options=options):
                return compiled(q, keys, values, mask, rows, scale, options)

            try:
                out = call()
            except Exception as err:  # a setting this torch or card refuses
                figures[rows] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
                break
            qg = q[:rows].reshape(rows, a.kv_heads, a.heads // a.kv_heads, a.head_dim)
            ref = F.scaled_dot_product_attention(
                qg, keys[:rows, :, : a.context], values[:rows, :, : a.context], scale=scale
            ).reshape(rows, a.heads, 1, a.head_dim)
            ms = timed_ms(call)
            figures[rows] = {
                "ms_per_call": round(ms, 4),
                "ms_per_step": round(ms * a.layers, 3),
                "max_abs_diff_vs_sdpa": float((out.float() - ref.float()).abs().max()),
            }
        results[name] = {"kernel_options": options, "rows": figures}
        print(json.dumps({name: results[name]}), flush=True)
    print("RESULT " + json.dumps({"args": vars(a), "results": results}))


if __name__ == "__main__":
    main()
