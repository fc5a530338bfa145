"""Where the time of a step goes: a few steps under torch.profiler, summarised by kernel category.

Used by `python -m benchmarks.train_step --profile N` (a training step) and `python -m benchmarks.serving`'s
profile phase (the engine's decode step and prefill). On CUDA the summary is about device work
(kernels, memcpy, memset): the GPU is busy where any of it runs (intervals merged across streams) and
idle otherwise, so the idle share is what the CPU side (Python, launches, syncs) or the gaps between a
CUDA graph's kernels cost the step. On CPU there are no kernels: the same summary is built from the
ops' self CPU times (user annotations left out, so their Python time counts as idle), which lets CI
run it.

A step may mark its parts with record_function ranges (a training step: FORWARD / BACKWARD /
OPTIMIZER, the default `ranges`). A kernel is put in a range by the time its launching op (torch links
each kernel to one) started on the CPU, not by the call tree: the backward's ops run in autograd's own
thread, outside the range. Everything launched inside OPTIMIZER is the optimizer category, whatever
its kernels are called.
"""

from __future__ import annotations

import bisect
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer step"
RANGES = (FORWARD, BACKWARD, OPTIMIZER)
MATMUL, ATTENTION, TRITON, ATEN = "matmul", "attention", "triton", "elementwise/other aten"
MEMORY, NCCL, OTHER = "memcpy/memset", "nccl", "other"
CATEGORIES = (MATMUL, ATTENTION, TRITON, ATEN, MEMORY, NCCL, OPTIMIZER, OTHER)
TOP_KERNELS = 20
NAME_WIDTH = 90
TRACE_LIMIT_MB = 16  # what a lent GPU machine sends back

ATTENTION_MARKERS = ("flash", "fmha", "sdpa", "efficient_attention", "scaled_dot_product", "attention")
MATMUL_MARKERS = ("gemm", "gemv", "cutlass", "cublas", "xmma", "nvjet", "matmul")  # nvjet: cuBLAS on Hopper
ATEN_MARKERS = ("at::", "aten::", "elementwise", "reduce_kernel", "(anonymous namespace)")
MM_OP = re.compile(r"(?<![a-z])(add|b|baddb)?mm(?![a-z])")  # aten::mm, addmm, bmm, baddbmm, _scaled_mm
# Device events that are not work: the GPU-side spans of record_function ranges, syncs.
NOT_WORK = {"gpu_user_annotation", "cuda_sync", "overhead"}


def category(name: str) -> str:
    """The category of a CUDA kernel or CPU op, from its name (one of CATEGORIES but OPTIMIZER)."""
    n = name.lower()
    if "nccl" in n:
        return NCCL
    if n.startswith(("memcpy", "memset")):
        return MEMORY
    if n.startswith("triton_tem"):  # inductor's templates: autotuned matmuls (or flex attention)
        return ATTENTION if any(m in n for m in ATTENTION_MARKERS) else MATMUL
    if n.startswith("triton_"):  # compiled fused kernels, whatever ops they fuse
        return TRITON
    if any(m in n for m in ATTENTION_MARKERS):
        return ATTENTION
    if any(m in n for m in MATMUL_MARKERS) or MM_OP.search(n):
        return MATMUL
    if any(m in n for m in ATEN_MARKERS):
        return ATEN
    return OTHER


@dataclass
class Work:
    """One kernel (CUDA), or one op's self time (CPU); times in microseconds on the profiler's clock."""

    name: str
    start: float
    end: float
    duration: float


def device_work(events) -> list[Work]:
    """Kernels, memcpy and memset: the device events but the GPU-side spans of annotations and syncs."""
    work = []
    for e in events:
        if e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False) or e.name == "Context Sync":
            continue
        if getattr(e, "activity_type", None) in NOT_WORK:
            continue
        work.append(Work(e.name, e.time_range.start, e.time_range.end, e.time_range.elapsed_us()))
    return work


def device_launches(events, work: list[Work]) -> list[tuple[float, str, float]]:
    """(CPU start of the op that launched it, name, duration) of every kernel torch linked to an op."""
    names = {w.name for w in work}  # annotations' GPU spans are linked to them too: not work
    return [
        (e.time_range.start, k.name, k.duration)
        for e in events
        if e.device_type == DeviceType.CPU
        for k in e.kernels
        if k.name in names
    ]


def cpu_work(events) -> list[Work]:
    """Every op's self CPU time; user annotations (ranges, ProfilerStep) left out."""
    work = []
    for e in events:
        if e.device_type != DeviceType.CPU or getattr(e, "is_user_annotation", False) or e.is_async:
            continue
        if e.self_cpu_time_total > 0:
            work.append(Work(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total))
    return work


def merged_length(work: list[Work]) -> float:
    """Time covered by at least one item (overlapping streams counted once)."""
    total, reach = 0.0, float("-inf")
    for w in sorted(work, key=lambda w: w.start):
        if w.end > reach:
            total += w.end - max(w.start, reach)
            reach = w.end
    return total


class RangeFinder:
    """Which of the step's record_function ranges (on the CPU) contains a given time."""

    def __init__(self, events, names: Sequence[str]):
        self.spans = sorted(
            (e.time_range.start, e.time_range.end, e.name)
            for e in events
            if e.name in names and e.device_type == DeviceType.CPU
        )
        self.starts = [start for start, _, _ in self.spans]

    def at(self, t: float | None) -> str | None:
        if t is None:
            return None
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and t < self.spans[i][1]:
            return self.spans[i][2]
        return None


@dataclass
class Tally:
    """Microseconds of work over all profiled steps, by category, by range and by kernel name."""

    by_category: dict[str, float]
    by_range: dict[str, float]
    calls: dict[str, int]
    by_name: dict[str, float]


def tally(
    work: list[Work], launches: list[tuple[float, str, float]], ranges: RangeFinder, names: Sequence[str]
) -> Tally:
    t = Tally(dict.fromkeys(CATEGORIES, 0.0), dict.fromkeys(names, 0.0), defaultdict(int), defaultdict(float))
    for w in work:
        t.by_category[category(w.name)] += w.duration
        t.calls[w.name] += 1
        t.by_name[w.name] += w.duration
    for launched, name, duration in launches:
        where = ranges.at(launched)
        if where:
            t.by_range[where] += duration
        if where == OPTIMIZER:  # counted as optimizer, not under its own name's category
            t.by_category[category(name)] -= duration
            t.by_category[OPTIMIZER] += duration
    return t


def summarize(events, steps: int, seconds: float, ranges: Sequence[str] = RANGES) -> dict:
    """Per-step summary of the profiled steps' events (see the module docstring); times in ms per step."""
    work = device_work(events)
    on_device = bool(work)
    if on_device:
        launches = device_launches(events, work)
    else:
        work = cpu_work(events)
        launches = [(w.start, w.name, w.duration) for w in work]
    finder = RangeFinder(events, ranges)
    t = tally(work, launches, finder, ranges)
    wall_ms = 1000 * seconds / steps

    def ms(us: float) -> float:  # microseconds over all steps -> ms per step
        return round(us / 1000 / steps, 3)

    def share(us: float) -> float:  # -> % of the step's wall time
        return round(100 * us / 1000 / steps / wall_ms, 2)

    busy = merged_length(work) if on_device else sum(w.duration for w in work)
    range_wall = dict.fromkeys(ranges, 0.0)
    for start, end, name in finder.spans:
        range_wall[name] += end - start
    top = sorted(t.by_name, key=t.by_name.__getitem__, reverse=True)[:TOP_KERNELS]
    return {
        "steps": steps,
        "source": "CUDA kernels" if on_device else "CPU ops (self time)",
        "wall_ms_per_step": round(wall_ms, 3),
        "work_ms_per_step": ms(sum(w.duration for w in work)),
        "busy_ms_per_step": ms(busy),
        "idle_pct": round(max(0.0, 100 - share(busy)), 2),
        "categories": [{"name": c, "ms_per_step": ms(us), "pct": share(us)} for c, us in t.by_category.items()],
        "ranges": [
            {"name": r, "wall_ms_per_step": ms(range_wall[r]), "work_ms_per_step": ms(t.by_range[r])} for r in ranges
        ],
        "top_kernels": [
            {
                "name": name[:NAME_WIDTH],
                "calls_per_step": round(t.calls[name] / steps, 2),
                "ms_per_step": ms(t.by_name[name]),
                "pct": share(t.by_name[name]),
            }
            for name in top
        ],
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(
    run_step: Callable[[int], object],
    warmup_step: int,
    steps: Sequence[int],
    device: torch.device,
    trace: Path | None = None,
    ranges: Sequence[str] = RANGES,
) -> dict:
    """Run `warmup_step` (profiler warm-up, not recorded) then `steps` under torch.profiler; their summary.

    The wall time runs from the end of the warm-up to the end of the last step's device work, so it
    leaves out the profiler's start and its post-processing (but not its per-op overhead).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    plan = schedule(wait=0, warmup=1, active=len(steps), repeat=1)
    with profile(activities=activities, schedule=plan) as prof:
        run_step(warmup_step)
        synchronize(device)
        prof.step()
        started = time.perf_counter()
        for i, step in enumerate(steps, 1):
            run_step(step)
            if i == len(steps):
                synchronize(device)
                seconds = time.perf_counter() - started
            prof.step()  # after the last step: the profiler stops and collects
    if trace:  # first, so that the raw events are kept whatever happens next
        prof.export_chrome_trace(str(trace))  # gzipped when the name ends in .gz
    summary = summarize(prof.events(), len(steps), seconds, ranges)
    summary["trace"] = {"path": str(trace), "mb": round(trace.stat().st_size / 2**20, 2)} if trace else None
    return summary


def format_summary(s: dict) -> str:
    """The summary as three small tables (categories, ranges, top kernels), for the terminal."""
    on_device = s["source"] == "CUDA kernels"
    idle_ms = max(0.0, s["wall_ms_per_step"] - s["busy_ms_per_step"])
    lines = [
        f"profile: {s['steps']} steps under torch.profiler, {s['source']} (the profiler's overhead is in the wall time)",
        f"  wall {s['wall_ms_per_step']:.1f} ms/step, {'GPU' if on_device else 'ops'} busy {s['busy_ms_per_step']:.1f}"
        f" ms/step (durations summed: {s['work_ms_per_step']:.1f}), idle {s['idle_pct']:.1f}%",
        f"  {'category':40}{'ms/step':>12}{'% of step':>12}",
    ]
    lines += [f"  {c['name']:40}{c['ms_per_step']:12.2f}{c['pct']:12.1f}" for c in s["categories"]]
    lines.append(f"  {'idle (nothing running)':40}{idle_ms:12.2f}{s['idle_pct']:12.1f}")
    if s["ranges"]:
        lines.append(f"  {'range':40}{'CPU ms/step':>12}{'work ms/step':>14}")
        lines += [f"  {r['name']:40}{r['wall_ms_per_step']:12.2f}{r['work_ms_per_step']:14.2f}" for r in s["ranges"]]
    title = f"top {TOP_KERNELS} {'kernels' if on_device else 'ops'}"
    lines.append(f"  {title:{NAME_WIDTH}}{'calls/step':>11}{'ms/step':>10}{'% of step':>11}")
    lines += [
        f"  {k['name']:{NAME_WIDTH}}{k['calls_per_step']:11.1f}{k['ms_per_step']:10.2f}{k['pct']:11.1f}"
        for k in s["top_kernels"]
    ]
    if s.get("trace"):
        t = s["trace"]
        warning = (
            f": over {TRACE_LIMIT_MB} MB, profile fewer steps or gzip (.json.gz)" if t["mb"] >= TRACE_LIMIT_MB else ""
        )
        lines.append(f"  chrome trace: {t['path']} ({t['mb']:.1f} MB{warning})")
    return "\n".join(lines)
