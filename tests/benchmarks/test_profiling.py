"""benchmarks/profiling.py: kernel names to categories, the summary of (synthetic) CUDA events, and
`python -m benchmarks.train_step --profile` end to end on CPU with the tiny Mistral."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from benchmarks import profiling as P

ROOT = Path(__file__).resolve().parents[2]

KERNELS = [
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64", P.MATMUL),
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn", P.MATMUL),
    ("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_64x64_32x6_tn_align8>", P.MATMUL),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", P.MATMUL),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __half, float>", P.MATMUL),
    ("triton_tem_fused_mm_0", P.MATMUL),
    ("aten::mm", P.MATMUL),
    ("aten::addmm", P.MATMUL),
    ("aten::_scaled_mm", P.MATMUL),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>, true>", P.ATTENTION),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", P.ATTENTION),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0", P.ATTENTION),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", P.ATTENTION),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", P.TRITON),
    ("triton_poi_fused_add_mul_silu_1", P.TRITON),
    (
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std::array<char*, 3> >",
        P.ATEN,
    ),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float>>>", P.ATEN),
    ("aten::mul", P.ATEN),
    ("aten::comm_stub", P.ATEN),  # "mm" inside a word is not a matmul
    ("Memcpy DtoD (Device -> Device)", P.MEMORY),
    ("Memset (Device)", P.MEMORY),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", P.NCCL),
    ("void kOptimizer32bit2State<float, 5, 0>", P.OTHER),  # the optimizer category comes from the range
    ("autograd::engine::evaluate_function: MmBackward0", P.OTHER),
]


@pytest.mark.parametrize(("name", "expected"), KERNELS)
def test_kernel_names_fall_in_their_category(name, expected):
    assert P.category(name) == expected


def event(id_: int, name: str, start: float, end: float, **kw) -> FunctionEvent:
    return FunctionEvent(id=id_, name=name, thread=kw.pop("thread", 1), start_us=start, end_us=end, **kw)


def device_event(name: str, start: float, end: float, launched_by: FunctionEvent, **kw) -> FunctionEvent:
    """A device event, linked to the op that launched it as torch links them."""
    kw = {"device_type": DeviceType.CUDA, "activity_type": "kernel", "use_device": "cuda"} | kw
    e = event(1000 + int(start), name, start, end, **kw)
    launched_by.append_kernel(name, 0, end - start)
    return e


def test_cuda_summary_merges_streams_and_puts_kernels_in_the_range_that_launched_them():
    spans = {P.FORWARD: (0, 100), P.BACKWARD: (100, 300), P.OPTIMIZER: (300, 350)}
    ranges = [event(2 + i, name, *span, is_user_annotation=True) for i, (name, span) in enumerate(spans.items())]
    ops = [
        event(10, "aten::mm", 10, 20),
        event(11, "aten::_flash_attention_backward", 150, 160, thread=2),  # autograd's thread, outside the range
        event(12, "Optimizer.step#PagedAdamW32bit.step", 310, 320),
        event(13, "aten::copy_", 2, 4),
    ]
    device = [
        device_event("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n", 20, 80, ops[0]),
        device_event("void pytorch_flash::flash_bwd_kernel<...>", 160, 200, ops[1]),
        device_event("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 170, 220, ops[1]),  # another stream: overlaps
        device_event("void kOptimizer32bit2State<float, 5, 0>", 320, 330, ops[2]),
        device_event("Memcpy HtoD (Pageable -> Device)", 5, 8, ops[3], activity_type="gpu_memcpy"),
        # the forward range's GPU-side span: torch links it to the range like a kernel, but it is no work
        device_event(P.FORWARD, 20, 80, ranges[0], activity_type="gpu_user_annotation", is_user_annotation=True),
    ]
    step = event(1, "ProfilerStep*", 0, 400, is_user_annotation=True)
    s = P.summarize([step, *ranges, *ops, *device], steps=1, seconds=400e-6)

    assert s["source"] == "CUDA kernels"
    assert s["wall_ms_per_step"] == pytest.approx(0.4)
    assert s["busy_ms_per_step"] == pytest.approx((3 + 60 + 60 + 10) / 1000)  # flash + nccl merged: 160-220
    assert s["work_ms_per_step"] == pytest.approx((3 + 60 + 40 + 50 + 10) / 1000)
    assert s["idle_pct"] == pytest.approx(100 * (1 - 133 / 400), abs=0.01)
    categories = {c["name"]: c["ms_per_step"] for c in s["categories"]}
    assert categories == pytest.approx(
        {P.MATMUL: 0.06, P.ATTENTION: 0.04, P.NCCL: 0.05, P.OPTIMIZER: 0.01, P.MEMORY: 0.003}
        | {P.TRITON: 0, P.ATEN: 0, P.OTHER: 0}
    )
    by_range = {r["name"]: (r["wall_ms_per_step"], r["work_ms_per_step"]) for r in s["ranges"]}
    assert by_range == {P.FORWARD: (0.1, 0.063), P.BACKWARD: (0.2, 0.09), P.OPTIMIZER: (0.05, 0.01)}
    assert [k["name"][:12] for k in s["top_kernels"]] == [
        "sm90_xmma_ge",
        "ncclDevKerne",
        "void pytorch",
        "void kOptimi",
        "Memcpy HtoD ",
    ]
    assert s["top_kernels"][0] == {"name": device[0].name, "calls_per_step": 1, "ms_per_step": 0.06, "pct": 15.0}
    assert "GPU busy 0.1 ms/step" in P.format_summary(s | {"trace": None})


@pytest.mark.slow  # ~17 s of benchmark code, not the product
def test_benchmark_profiles_the_project_step_on_cpu(tmp_path):
    out, trace = tmp_path / "bench.json", tmp_path / "trace.json.gz"
    args = "--model-name tiny-mistral --data builtin:mobile_health --device cpu --steps 2 --warmup 1".split()
    args += "--max-length 128 --batch-tokens 512 --skip-baseline --check-rows 0 --profile 2".split()
    args += ["--profile-trace", str(trace), "--json-out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "profile: 2 steps under torch.profiler, CPU ops (self time)" in result.stdout
    s = json.loads(out.read_text())["profile"]
    wall = s["wall_ms_per_step"]
    assert s["steps"] == 2 and wall > 0
    categories = {c["name"]: c["ms_per_step"] for c in s["categories"]}
    assert list(categories) == list(P.CATEGORIES) and min(categories.values()) >= 0
    for name in (P.MATMUL, P.ATTENTION, P.ATEN, P.OPTIMIZER):
        assert categories[name] > 0, name
    assert sum(categories.values()) == pytest.approx(s["work_ms_per_step"], abs=0.01)
    assert s["busy_ms_per_step"] <= wall * 1.02 and 0 <= s["idle_pct"] < 100
    ranges = {r["name"]: r for r in s["ranges"]}
    assert all(r["wall_ms_per_step"] > 0 and r["work_ms_per_step"] > 0 for r in ranges.values())
    assert sum(r["wall_ms_per_step"] for r in ranges.values()) <= wall * 1.02
    top = s["top_kernels"]
    assert 0 < len(top) <= P.TOP_KERNELS and top == sorted(top, key=lambda k: -k["ms_per_step"])
    assert not {k["name"] for k in top} & {*P.RANGES, "ProfilerStep*"}  # annotations are not work
    with gzip.open(trace, "rt") as f:
        assert json.load(f)["traceEvents"]
