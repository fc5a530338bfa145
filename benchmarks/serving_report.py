"""The benchmark's one table, built from the phases' results: printed, and written as JSON and markdown."""

from __future__ import annotations

import json
from pathlib import Path

from . import profiling as P

ORDER = ("hf", "engine", "service", "serve", "adapters", "batch")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _mem(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return " / ".join(f"{v:.1f}" for v in value) + " (per GPU, nvidia-smi)"
    return f"{value:.1f}"


def hf_rows(r: dict) -> list[tuple]:
    n = r.get("new_tokens")
    b1, bb, cb = r.get("batch1", {}), r.get("batch", {}), r.get("continuous", {})
    rows = [
        ("generate, batch 1: decode", b1.get("decode_ms_per_token"), "ms/token", f"{n} new tokens, greedy"),
        ("generate, batch 1: TTFT", b1.get("ttft_ms"), "ms", f"{b1.get('prompt_tokens')}-token prompt"),
        (f"generate, batch {bb.get('batch')}", bb.get("tok_s"), "tok/s", f"{n} new tokens each, left-padded"),
    ]
    if "skipped" in cb:
        rows.append(("generate_batch (continuous batching)", None, "tok/s", cb["skipped"]))
    elif cb:
        if cb.get("generation_s"):
            note = f"{cb['output_tokens']} tokens; whole call incl. warm-up {cb['tok_s_whole_call']:.0f} tok/s"
        else:
            note = f"{cb['output_tokens']} tokens; timed over the whole call, warm-up included"
        note += f"; {cb['failed']} requests FAILED" if cb["failed"] else ""
        rows.append((f"generate_batch, {cb['requests']} requests", cb.get("tok_s"), "tok/s", note))
    return rows


def engine_rows(r: dict) -> list[tuple]:
    s = r["single"]
    shape = f"{s['prompt_tokens']}-token prompt, {s['output_tokens']} tokens, median of {s['repeats']}"
    rows = [
        ("single stream: decode (first to last token)", s["decode_ms_per_token"], "ms/token", shape),
        ("single stream: TTFT", s["ttft_ms"], "ms", "submit to first token"),
    ]
    full = r.get("full_batch")
    if full:
        who = f"{full['requests']} requests at once, in process"
        rows.append((f"{who}: output tok/s", full["tok_s"], "tok/s", f"{full['output_tokens']} tokens"))
        rows += _engine_step_rows(who, full["engine"])
    for name, p in r.get("profile", {}).items():
        ms = {c["name"]: c["ms_per_step"] for c in p["categories"]}
        top = p["top_kernels"][0]["name"][:40] if p["top_kernels"] else "-"
        note = (
            f"{p['source']}: busy {100 - p['idle_pct']:.0f}%; matmul {ms[P.MATMUL]:.2f} ms, attention "
            f"{ms[P.ATTENTION]:.2f}, fused {ms[P.TRITON]:.2f}, other aten {ms[P.ATEN]:.2f}; top {top}"
        )
        rows.append((f"profile: {name}", p["wall_ms_per_step"], "ms", note))
    return rows


def _load_rows(r: dict, start: str, suffix: str) -> list[tuple]:
    """One timed HTTP load's rows; `start` says how its clients started, `suffix` tells its rows apart."""
    c = r["correctness"]
    wall = f"{r['output_tokens']} tokens in {r['wall_s']:.1f} s, first request sent to last answered"
    if r.get("ramp_s"):  # client k of C starts k * ramp_s / C after client 0
        clients = min(r["concurrency"], r["requests"])
        wall += f", so incl. the ramp (the last client starts {r['ramp_s'] * (clients - 1) / clients:.3g} s in)"
    return [
        (
            f"HTTP output throughput ({r['concurrency']} concurrent streams, {start})",
            r["tok_s"],
            "tok/s",
            f"{r['requests']} requests, streamed; {wall}",
        ),
        (f"HTTP TTFT p50{suffix}", r["ttft_p50_ms"], "ms", "client-side, request sent to first answer text"),
        (f"HTTP TTFT p99{suffix}", r["ttft_p99_ms"], "ms", None),
        (f"HTTP inter-token p50{suffix}", r["inter_token_p50_ms"], "ms/token", "(latency - TTFT) / (tokens - 1)"),
        (
            f"answers equal the prompt's answer alone{suffix}",
            f"{c['matching']}/{c['checked']}",
            "PASS" if c["passed"] else "FAIL",
            f"failed requests: {r['failed']}",
        ),
        *_engine_step_rows(f"Serve replica{suffix}", r.get("engine")),
    ]


def serve_rows(r: dict) -> list[tuple]:
    """The burst run (keys at the top level, row names as before), then the staggered run if there was one."""
    single = r["single_request"]
    rows = _load_rows(r, "all starting together", "")
    if "staggered" in r:
        spread = f"starts spread over {r['staggered']['ramp_s']:g} s"
        rows += _load_rows(r["staggered"], spread, f", {spread}")
    return rows + [
        ("HTTP single request alone: TTFT p50", single["ttft_p50_ms"], "ms", None),
        ("HTTP single request alone: inter-token p50", single["inter_token_p50_ms"], "ms/token", None),
    ]


def service_rows(r: dict) -> list[tuple]:
    """The replica's code in process (benchmarks/service_load.py): the serve burst's rows without HTTP."""
    c, who = r["correctness"], f"{r['concurrency']} streams in process, all starting together"
    return [
        (
            f"{who}: output tok/s",
            r["tok_s"],
            "tok/s",
            f"{r['requests']} requests through OpenAIService, no Ray or HTTP",
        ),
        (
            f"{who}: TTFT p50 / inter-token p50",
            r["ttft_p50_ms"],
            "ms",
            f"inter-token {_fmt(r['inter_token_p50_ms'])} ms",
        ),
        (
            f"{who}: answers equal the prompt's answer alone",
            f"{c['matching']}/{c['checked']}",
            "PASS" if c["passed"] else "FAIL",
            f"failed requests: {r['failed']}",
        ),
        *_engine_step_rows(who, r.get("engine")),
    ]


def adapter_rows(r: dict) -> list[tuple]:
    runs, checks = r["runs"], r["checks"]
    shape = f"batch {r['batch']}, {r['max_tokens']} tokens, median of {r.get('repeats', 1)} runs"
    return [
        ("bare base", runs["base"]["tok_s"], "tok/s", shape),
        ("adapter a merged", runs["a merged"]["tok_s"], "tok/s", f"{r['merged_vs_base_pct']:+.1f}% vs bare base"),
        ("adapter a (unmerged LoRA)", runs["a"]["tok_s"], "tok/s", f"{r['unmerged_vs_base_pct']:+.1f}% vs bare base"),
        (
            "a and b mixed in one batch",
            runs["a+b mixed"]["tok_s"],
            "tok/s",
            f"{r['mixed_vs_single_adapter_pct']:+.1f}% vs all on a",
        ),
        ("base rows on the LoRA engine", runs["base rows"]["tok_s"], "tok/s", None),
        (
            "mixed batch: a rows equal the all-a answers",
            f"{checks['mixed_a_rows_equal_all_a']}/{checks['mixed_a_rows']}",
            None,
            f"adapter a changed {checks['adapter_changes_answers']}/{r['batch']} answers vs base",
        ),
    ]


def _engine_step_rows(who: str, s: dict | None) -> list[tuple]:
    """The actors' engines from the inside (benchmarks/batch_job.py's engine_steps): busy time per
    decode step and where it went; none for a log without those lines."""
    if not s or not s["steps"]:
        return []
    actors = f" of {s['actors']} actors" if s["actors"] > 1 else ""
    note = (
        f"{s['steps']} steps{actors}, {s['rows_per_step']:.1f} rows/step, context {s['context_cols']:.0f} cols for "
        f"longest {s['longest']:.0f}; busy {s['busy_s']:.1f} s = GPU wait {s['gpu_wait_s']:.1f} + launch "
        f"{s['launch_s']:.1f} + text {s['text_s']:.1f} + prefill {s['prefill_s']:.1f} ({s['prefill_prompts']} "
        f"prompts, {s['prefill_tokens']} tokens) + other {s['other_s']:.1f} s"
    )
    return [(f"{who}: engine step loop", s["ms_per_step"], "ms/step", note)]


def _time_split_rows(who: str, t: dict | None) -> list[tuple]:
    """The job's time split (batch/timing.py) and its first engine's start-up; none for an older log."""
    if not t:
        return []
    parts = ("ray_start", "plan", "actors_ready", "waiting", "answering", "writing")
    split = ", ".join(f"{p.replace('_', ' ')} {t[p + '_s']:.1f}" for p in parts)
    ready = t["load_s"] + t["warm_up_s"]
    note = f"load {t['load_s']:.1f} + warm-up {t['warm_up_s']:.1f} s, compile cache {t['compile_cache']}"
    return [(f"{who}: time split", t["total_s"], "s", split), (f"{who}: engine ready", ready, "s", note)]


def batch_rows(r: dict) -> list[tuple]:
    rows = []
    for run in r["runs"]:
        who = f"{run['actors']} actor(s) x {run['gpus_per_actor']:g} GPU" + (
            f", {run['label']}" if run.get("label") else ""
        )
        rows += [
            (f"{who}: output throughput", run["tok_s"], "tok/s", f"{run['output_tokens']} tokens, job wall time"),
            (f"{who}: per GPU", run.get("tok_s_per_gpu"), "tok/s", None),
            (
                f"{who}: per GPU while answering",
                run.get("engine_tok_s_per_gpu"),
                "tok/s",
                f"engine calls only ({run.get('engine_calls', 0)}), start-up excluded; engines ready after "
                + ", ".join(f"{s:.0f}" for s in run.get("engine_ready_s", []))
                + " s",
            ),
            *_engine_step_rows(who, run.get("engine_steps")),
            *_time_split_rows(who, run.get("time_split")),
            (f"{who}: wall time", run["job_wall_s"], "s", f"process incl. start-up {run['process_wall_s']:.0f} s"),
            (
                f"{who}: rows written",
                f"{run['rows_written']}/{r['questions']}",
                None,
                f"{run['error_rows']} error rows, {run['distinct_ids']} distinct ids",
            ),
        ]
    return rows


ROWS = {
    "hf": hf_rows,
    "engine": engine_rows,
    "service": service_rows,
    "serve": serve_rows,
    "adapters": adapter_rows,
    "batch": batch_rows,
}


def table_rows(phases: dict) -> list[dict]:
    """One row per figure: phase, metric, value, unit, note (peak memory and phase time last)."""
    out = []
    for phase in ORDER:
        result = phases.get(phase)
        if result is None:
            continue
        if "error" in result:
            out.append(dict(phase=phase, metric="FAILED", value=None, unit=None, note=result["error"][:200]))
            continue
        for metric, value, unit, note in ROWS[phase](result):
            out.append(dict(phase=phase, metric=metric, value=value, unit=unit, note=note))
        peak = _mem(result.get("peak_gpu_gib"))
        out.append(
            dict(
                phase=phase,
                metric="peak GPU memory",
                value=peak,
                unit="GiB" if peak else None,
                note=result.get("peak_note"),
            )
        )
        out.append(dict(phase=phase, metric="phase time", value=result.get("phase_s"), unit="s", note=None))
    return out


def render(rows: list[dict], markdown: bool) -> str:
    cells = [["phase", "metric", "value", "unit", "note"]]
    cells += [[r["phase"], r["metric"], _fmt(r["value"]), r["unit"] or "", r["note"] or ""] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "---|" * len(cells[0]))
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) if i < 4 else c[i] for i in range(5)).rstrip() for c in cells)


def write_outputs(report: dict, json_out: Path | None, md_out: Path | None) -> None:
    report["table"] = table_rows(report["phases"])
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2, default=str))
    if md_out:
        md_out.parent.mkdir(parents=True, exist_ok=True)
        meta = report["meta"]
        head = f"Benchmark: {meta.get('model')} on {meta.get('gpu_name') or 'CPU'} ({meta.get('gpus')} GPU(s))"
        md_out.write_text(f"{head}\n\n{render(report['table'], markdown=True)}\n")
