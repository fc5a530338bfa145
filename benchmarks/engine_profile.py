"""Where the engine's GPU time goes: its decode step (1 sequence and a full batch) and a prefill
pack, each run alone under torch.profiler (benchmarks/profiling.py). For a decode step that is a
CUDA graph's replay on CUDA: the idle share is then the gaps between the graph's kernels."""

from __future__ import annotations

from pathlib import Path

from mistral_qa.engine import Engine

from . import engine_probe as probe
from .profiling import profile_steps


def profile_engine(
    engine: Engine, prompt: str, decode_rows: list[int], context: int, steps: int, trace_dir: Path | None
) -> dict:
    """{name: summary} for a decode step at each batch size in decode_rows (every row at `context`)
    and for one prefill pack of as many copies of `prompt` as fit one pack."""
    ids = engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    work = {
        f"decode step, {n} sequence(s) at {context} tokens": probe.decode_step(engine, n, context) for n in decode_rows
    }
    pack, copies = probe.prefill_pack(engine, ids)
    work[f"prefill pack, {copies} x {len(ids)}-token prompt"] = pack
    results = {}
    for i, (name, step) in enumerate(work.items()):
        trace = trace_dir / f"engine_profile_{i}.json.gz" if trace_dir else None
        step()  # the first call compiles or captures: outside the profile
        results[name] = profile_steps(lambda _, step=step: step(), 0, range(1, steps + 1), engine.device, trace, ())
    return results
