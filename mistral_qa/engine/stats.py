"""Where the engine thread's time goes: always-on counters of the step loop, cheap enough to leave
on (a few perf_counter readings per step, nothing per row).

A decode step's seconds split into launching it (host: building the step's inputs, replaying its
CUDA graph, queueing the sampling), waiting for the GPU (reading the step before it back, which
waits until the GPU has computed it), and streaming text (detokenising, callbacks); prefill has
its own count. `busy_s` is all the time in the step loop; what the four leave out is other host
work (bookkeeping of finished rows and cache slots). Seconds the engine thread sits idle, with no
work, are in none of them.

Only the engine thread writes. A reader takes `snapshot()`: copying the dict is one C call under
the GIL, so every number in it is whole, though it may hold half of one step's updates (off by one
step at most: fine for diagnosis, and no lock in the step loop).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    steps: int = 0  # decode steps launched
    rows: int = 0  # sequences in them, summed over the steps
    context_columns: int = 0  # cache columns attention read (the step's shape), summed over the steps
    longest: int = 0  # the step's longest sequence in tokens, summed over the steps
    busy_s: float = 0.0  # in the step loop
    launch_s: float = 0.0  # launching decode steps (host)
    gpu_wait_s: float = 0.0  # reading a step's tokens back: waiting for the GPU
    text_s: float = 0.0  # detokenising and handing out decode steps' text
    prefill_calls: int = 0
    prefill_prompts: int = 0
    prefill_tokens: int = 0  # prompt tokens, padding excluded
    prefill_s: float = 0.0  # prefill forwards, their first tokens and text included
    graphs: int = 0  # CUDA graphs recorded: a decode shape's first step (of launch_s)
    capture_s: float = 0.0  # recording them with their warm-up runs (the first also compiles the decode layer)

    def decode_step(self, rows: int, context_columns: int, longest: int) -> None:
        self.steps += 1
        self.rows += rows
        self.context_columns += context_columns
        self.longest += longest

    def prefill(self, prompts: int, tokens: int, seconds: float) -> None:
        self.prefill_calls += 1
        self.prefill_prompts += prompts
        self.prefill_tokens += tokens
        self.prefill_s += seconds

    def graph_captured(self, seconds: float) -> None:
        self.graphs += 1
        self.capture_s += seconds

    def snapshot(self) -> dict[str, float]:
        """Every counter, copied (safe to call from any thread)."""
        return dict(vars(self))


def difference(later: dict[str, float], earlier: dict[str, float]) -> dict[str, float]:
    """The counters of the window between two snapshots."""
    return {name: value - earlier[name] for name, value in later.items()}


def summary(counters: dict[str, float]) -> dict[str, float]:
    """Counters (a snapshot or a window) as figures: per decode step means (ms of the busy step loop,
    prefill included; rows; attention context columns; the longest row), the seconds, and "other":
    busy time outside launching, waiting for the GPU, streaming text and prefill."""
    steps = counters["steps"]

    def per_step(value: float) -> float:
        return value / steps if steps else 0.0

    named = sum(counters[k] for k in ("launch_s", "gpu_wait_s", "text_s", "prefill_s"))
    return {
        "steps": steps,
        "ms_per_step": per_step(counters["busy_s"] * 1000),
        "rows_per_step": per_step(counters["rows"]),
        "context_cols": per_step(counters["context_columns"]),
        "longest": per_step(counters["longest"]),
        **{k: counters[k] for k in ("busy_s", "launch_s", "gpu_wait_s", "text_s", "prefill_s")},
        "other_s": counters["busy_s"] - named,
        **{k: counters[k] for k in ("prefill_calls", "prefill_prompts", "prefill_tokens", "graphs", "capture_s")},
    }
