"""What benchmarks/train_step.py reports for each phase, and its table.

Every phase (each Trainer baseline and the project's step) is timed the same way: one wall-clock time
per optimiser step, taken after the device finished it, over the timed steps that follow the warm-up.
A phase reports the median step with its spread (p10-p90), non-padding tokens/s over all its timed
steps (what a run gets) and the median of its steps' tokens/s (what one slow step cannot move), its
padding, MFU and peak memory. Speed-ups are quoted against the strongest baseline of the same run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def spread(values: list[float]) -> tuple[float, float, float]:
    """(p10, median, p90) of the values; one value is its own spread."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], statistics.median(values), deciles[8]


@dataclass
class Result:
    """The timed steps of one phase: per step, its seconds and its rows' lengths."""

    name: str
    step_seconds: list[float]
    step_lengths: list[list[int]]  # each timed step's row lengths (non-padding tokens)
    step_padded: list[int]  # tokens the device computed at each step: rows x longest
    flops: float
    peak_gib: float
    baseline: bool = False
    notes: dict = field(default_factory=dict)  # e.g. the batch sizes that ran out of memory
    steps: int = 0
    seconds: float = 0.0
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    s_per_step: float = 0.0  # the median step
    s_per_step_p10: float = 0.0
    s_per_step_p90: float = 0.0
    tokens_per_s: float = 0.0  # all timed steps: total non-padding tokens / total seconds
    step_tokens_per_s: float = 0.0  # the median step's
    step_tokens_per_s_p10: float = 0.0
    step_tokens_per_s_p90: float = 0.0
    padding_pct: float = 0.0
    mfu_pct: float | None = None

    def finish(self, peak_tflops: float | None) -> Result:
        if len(self.step_seconds) != len(self.step_lengths) or not self.step_seconds:
            raise ValueError(f"{self.name}: {len(self.step_seconds)} step times for {len(self.step_lengths)} batches")
        self.steps, self.seconds = len(self.step_seconds), sum(self.step_seconds)
        self.rows = sum(len(lengths) for lengths in self.step_lengths)
        self.tokens, self.padded_tokens = sum(map(sum, self.step_lengths)), sum(self.step_padded)
        self.s_per_step_p10, self.s_per_step, self.s_per_step_p90 = spread(self.step_seconds)
        per_step = [sum(lengths) / s for lengths, s in zip(self.step_lengths, self.step_seconds)]
        self.step_tokens_per_s_p10, self.step_tokens_per_s, self.step_tokens_per_s_p90 = spread(per_step)
        self.tokens_per_s = self.tokens / self.seconds
        self.padding_pct = 100 * (1 - self.tokens / self.padded_tokens)
        self.mfu_pct = 100 * self.flops / self.seconds / (peak_tflops * 1e12) if peak_tflops else None
        return self


def strongest_baseline(results: list[Result]) -> Result | None:
    """The baseline with the most non-padding tokens/s over its timed steps."""
    return max((r for r in results if r.baseline), key=lambda r: r.tokens_per_s, default=None)


def speedups(results: list[Result]) -> list[str]:
    """Each project phase against the strongest baseline: all-steps tok/s and median-step tok/s."""
    best = strongest_baseline(results)
    if best is None:
        return []
    lines = []
    for r in results:
        if not r.baseline:
            label = r.name.split()[0]
            lines.append(
                f"speed-up {label} / strongest baseline ({best.name.split()[0]}): "
                f"{r.tokens_per_s / best.tokens_per_s:.2f}x non-pad tok/s over all timed steps, "
                f"{r.step_tokens_per_s / best.step_tokens_per_s:.2f}x median step; "
                f"peak memory {r.peak_gib:.1f} vs {best.peak_gib:.1f} GiB"
            )
    return lines


def table(results: list[Result], check: dict | None, header: str) -> str:
    head = (
        f"{'':50}{'s/step median [p10-p90]':>26}{'tok/s all':>11}{'tok/s median [p10-p90]':>28}"
        f"{'pad %':>7}{'MFU %':>7}{'peak GiB':>10}{'rows/step':>10}"
    )
    lines = [header, head]
    for r in results:
        mfu = f"{r.mfu_pct:.1f}" if r.mfu_pct is not None else "-"
        step = f"{r.s_per_step:.3f} [{r.s_per_step_p10:.3f}-{r.s_per_step_p90:.3f}]"
        tps = f"{r.step_tokens_per_s:,.0f} [{r.step_tokens_per_s_p10:,.0f}-{r.step_tokens_per_s_p90:,.0f}]"
        lines.append(
            f"{r.name:50}{step:>26}{r.tokens_per_s:11,.0f}{tps:>28}{r.padding_pct:7.1f}{mfu:>7}"
            f"{r.peak_gib:10.2f}{r.rows / r.steps:10.1f}"
        )
    for r in results:
        if r.notes.get("out_of_memory"):
            lines.append(f"{r.name.split()[0]}: out of memory at {r.notes['out_of_memory']} rows per batch")
    lines += speedups(results)
    if check:
        verdict = "PASS" if check["agree"] else "FAIL"
        lines.append(
            f"agreement: per-token loss on {check['rows']} rows ({check['tokens']} tokens, mean {check['mean_loss']:.4f}): "
            f"B vs HF max |diff| {check['max_abs_diff']:.2e}, mean {check['mean_abs_diff']:.2e}; "
            f"HF vs itself max {check['hf_vs_itself_max_abs_diff']:.2e}; tolerance {check['tolerance']:.2e} -> {verdict}"
        )
    return "\n".join(lines)
