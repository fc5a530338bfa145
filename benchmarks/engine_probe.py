"""The engine's two GPU workloads, one call each, for measuring them alone (engine_profile.py): a
decode step of `rows` running sequences, and one prefill pack. Built on the engine's public hook
`Engine.runner`; only while the engine is idle: they write the KV cache of its first slots, which
holds no request then."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mistral_qa.engine import Engine


def _runner(engine: Engine):
    if engine.pending:
        raise RuntimeError("probe the engine only while it answers nothing")
    engine.engine_thread.wait_parked()  # the step launched ahead of the last answer may still run
    return engine.runner


def decode_step(engine: Engine, rows: int, context: int) -> Callable[[], None]:
    """One decode step for slots 0..rows-1, each at position context - 1 (the base, no adapter): the
    same call, and on CUDA the same captured graph, that the engine replays for such a batch."""
    runner = _runner(engine)
    if not 1 <= rows <= runner.max_batch_size or not 1 <= context <= runner.max_context:
        raise ValueError(
            f"rows {rows} / context {context}: the engine has {runner.max_batch_size} x {runner.max_context}"
        )
    ids = torch.full((rows,), 1, dtype=torch.long, device=runner.decoder.device)
    positions, adapters = [context - 1] * rows, [-1] * rows

    def step() -> None:
        runner.steps(ids, positions, adapters)

    return step


def prefill_pack(engine: Engine, prompt_ids: list[int]) -> tuple[Callable[[], None], int]:
    """One prefill forward of as many copies of the prompt as fill a pack (into slots 0..), padded as
    the engine pads it; and how many copies that is."""
    runner = _runner(engine)
    copies = max(1, min(runner.steps.prefill_tokens // len(prompt_ids), runner.max_batch_size))
    prompts = [prompt_ids] * copies
    total = copies * len(prompt_ids)

    def step() -> None:
        runner.decoder.prefill(prompts, 0, [-1] * copies, *runner.steps.prefill_padding(total))

    return step, copies
