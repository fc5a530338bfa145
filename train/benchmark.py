"""Speed of the training step: the usual transformers Trainer + PEFT recipe against this project's step.

    python -m train.benchmark                                        # Mistral-7B shape, random fp16 weights, 1 GPU
    python -m train.benchmark --compile --batch-tokens 4096 --json-out bench.json
    python -m train.benchmark --model-name tiny-mistral --data builtin:mobile_health --device cpu --steps 3 --warmup 1
    python -m train.benchmark --skip-baseline --check-rows 0 --profile 3 --profile-trace step.json.gz  # where B's time goes
    python -m train.benchmark --skip-baseline --batch-tokens 0        # B on A's 8-row batches: what grouping buys

In one process on one device, on the same rows (Alpaca prompt + output, truncated at --max-length),
the same base weights (model.source=random, seed 0) and LoRA r=16 on q_proj/v_proj:

  A. baseline: transformers Trainer, fp16, paged AdamW 32-bit, lr 2e-4 cosine, --baseline-batch rows
     padded to the longest (train/hf_baseline.py);
  B. the project's step (train/step.py, as the Ray Train workers run it): --batch-tokens
     length-grouped batches, no attention mask, lm_head only on labelled positions, --compile;
  B'. B's batches timed a second time (--no-second-pass skips it): the first visit of a batch shape
     can cost more than later ones (compilation guards, allocator growth, per-shape kernel plans),
     and a long run sees most of its shapes many times;
  C. per-token losses of B's path against HF's forward on --check-rows rows (train/agreement.py).

Each phase starts from an empty device (memory freed, peak reset). Prints one table: seconds per
step, non-padding tokens/s, padding, MFU (LoRA: (4N + 12 L d T) FLOPs per token, N the matmul
weights incl. lm_head, T the row's length; fp16 dense peak of the card) and peak memory.
Exits 1 when C's losses disagree. --profile N then runs N of B's timed batches again under torch.profiler
(mistral_qa/profiling.py) and prints the time per kernel category, per step part and of the top kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function

from mistral_qa import profiling
from mistral_qa.config import DataConfig, LoraSettings, ModelConfig, TrainingConfig, TrainJobConfig
from mistral_qa.data import clean_rows, read_rows
from mistral_qa.model import RANDOM_SHAPES, load_tokenizer
from mistral_qa.prompt import build_prompt

from . import agreement, hf_baseline
from .batches import TokenBudgetSchedule, micro_batch_indices, step_seed
from .optim import build_optimizer, build_scheduler
from .step import autocast, backward, build_trainable, make_batch, optimizer_step, peak_memory_gib

LORA = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"])
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense fp16/bf16


@dataclass
class Result:
    """Timed steps of one phase and what they processed."""

    name: str
    steps: int
    seconds: float
    rows: int
    tokens: int  # non-padding
    padded_tokens: int  # what the device computed: rows x longest, summed over batches
    flops: float
    peak_gib: float
    s_per_step: float = 0.0
    tokens_per_s: float = 0.0
    padding_pct: float = 0.0
    mfu_pct: float | None = None
    step_seconds: list[float] = field(default_factory=list)  # each timed step, in order

    def finish(self, peak_tflops: float | None) -> Result:
        self.s_per_step = self.seconds / self.steps
        self.tokens_per_s = self.tokens / self.seconds
        self.padding_pct = 100 * (1 - self.tokens / self.padded_tokens)
        self.mfu_pct = 100 * self.flops / self.seconds / (peak_tflops * 1e12) if peak_tflops else None
        return self


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-name", choices=sorted(RANDOM_SHAPES), default="mistral-7b", help="random-weights shape")
    p.add_argument("--data", default="../shared/data/alpaca_en_demo.json", help="Alpaca rows (file or builtin:...)")
    p.add_argument("--max-length", type=int, default=512, help="truncate rows at this many tokens")
    p.add_argument("--steps", type=positive, default=20, help="timed optimiser steps per phase")
    p.add_argument("--warmup", type=positive, default=5, help="untimed steps first (compilation, allocator, paging)")
    p.add_argument("--baseline-batch", type=int, default=8, help="rows per baseline batch")
    p.add_argument(
        "--batch-tokens",
        type=non_negative,
        default=4096,
        help="token budget of the project's batches (0: --baseline-batch rows per batch, shuffled, as A)",
    )
    p.add_argument("--compile", action="store_true", help="the project's step with training.compile")
    p.add_argument(
        "--cudnn-attention", action="store_true", help="the project's step with training.cudnn_attention (A/B)"
    )
    p.add_argument("--skip-baseline", action="store_true", help="run B and C only (e.g. to sweep --batch-tokens)")
    p.add_argument("--check-rows", type=int, default=64, help="rows of the per-token loss check (0: skip it)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, help="the card's dense fp16 peak (default: from its name)")
    p.add_argument("--seed", type=int, default=1234, help="data order, LoRA init and dropout")
    p.add_argument("--json-out", type=Path, help="write the results here as JSON")
    p.add_argument(
        "--second-pass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time B's batches a second time (B'): the first visit of a batch shape can cost extra",
    )
    p.add_argument("--profile", type=non_negative, default=0, help="then profile this many of B's steps (0: off)")
    p.add_argument("--profile-trace", type=Path, help="with --profile: write a chrome trace here (.gz: gzipped)")
    return p.parse_args(argv)


def load_items(source: str, tokenizer, max_length: int) -> list[dict]:
    """Alpaca prompt + output of every usable row, truncated; the loss on every token (as the reference)."""
    rows, _ = clean_rows(read_rows(source))
    items = []
    for row in rows:
        text = build_prompt(row["instruction"], row["input"]) + row["output"].strip()
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        items.append({"input_ids": ids, "labels": list(ids)})
    return items


def flops_per_row(model_cfg: ModelConfig, length: int) -> float:
    """LoRA training FLOPs of one row: (4N + 12 L d T) per token, T = the row's length."""
    s = RANDOM_SHAPES[model_cfg.name]
    d, layers, kv = s["hidden_size"], s["num_hidden_layers"], s["num_key_value_heads"]
    kv_dim = d // s["num_attention_heads"] * kv
    per_layer = d * (2 * d + 2 * kv_dim) + 3 * d * s["intermediate_size"]
    n = layers * per_layer + d * s["vocab_size"]  # + lm_head
    return length * (4 * n + 12 * layers * d * length)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def fresh_device(device: torch.device) -> None:
    """Free what the previous phase left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_baseline(args, model_cfg: ModelConfig, items: list[dict], tokenizer, device) -> Result:
    fresh_device(device)
    seconds, batches = hf_baseline.run_trainer(
        model_cfg, LORA, items, tokenizer, args.baseline_batch, args.warmup, args.steps, args.seed, device
    )
    lengths = [n for row_lengths, _ in batches for n in row_lengths]
    return Result(
        name=f"A  HF Trainer + PEFT, {args.baseline_batch} rows/batch",
        steps=args.steps,
        seconds=seconds,
        rows=len(lengths),
        tokens=sum(lengths),
        padded_tokens=sum(padded for _, padded in batches),
        flops=sum(flops_per_row(model_cfg, n) for n in lengths),
        peak_gib=peak_memory_gib(device),
    )


def project_config(args, model_cfg: ModelConfig, device: torch.device) -> TrainJobConfig:
    on_cuda = device.type == "cuda"
    return TrainJobConfig(
        model=model_cfg,
        lora=LORA,
        data=DataConfig(max_length=args.max_length, loss_on="all"),
        optim={"name": "paged_adamw_32bit", "lr": 2e-4, "schedule": "cosine", "max_grad_norm": 0.3},
        training=TrainingConfig(
            max_steps=args.warmup + args.steps,
            batch_size=args.baseline_batch,
            batch_tokens=args.batch_tokens or None,
            compile=args.compile,
            cudnn_attention=args.cudnn_attention,
            precision="fp16" if on_cuda else "fp32",
            seed=args.seed,
        ),
        scaling={"use_gpu": on_cuda},
    )


def run_project(
    args, cfg: TrainJobConfig, items: list[dict], pad_id: int, device
) -> tuple[list[Result], torch.nn.Module, dict | None]:
    """The Ray Train worker's step (one worker, one micro-batch per step): B's result (and B''s), the
    model for phase C and, with --profile, the profile of the same step."""
    fresh_device(device)
    dtype = torch.float16 if cfg.training.precision == "fp16" else None
    model = build_trainable(cfg, dtype, device)
    optimizer = build_optimizer(cfg.optim, [p for p in model.parameters() if p.requires_grad], device.type == "cuda")
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.training.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is not None)
    lengths = [len(x["input_ids"]) for x in items]
    schedule = TokenBudgetSchedule(lengths, args.seed, args.batch_tokens) if args.batch_tokens else None

    def batch_rows(step: int) -> list[int]:
        if schedule is not None:
            return schedule.micro_batch_indices(step, 0, 1, 1, 0)
        # --baseline-batch rows per batch, as training picks them without training.batch_tokens
        return micro_batch_indices(len(items), args.seed, step, 0, 1, args.baseline_batch, 1, 0)

    model.train()

    def train_step(step: int) -> list[int]:
        """One optimiser step on the step's batch, its parts named for the profiler; its rows' lengths."""
        torch.manual_seed(step_seed(args.seed, step, 0))
        rows = batch_rows(step)
        batch = make_batch([items[i] for i in rows], pad_id, device)
        with record_function(profiling.FORWARD), autocast(device, dtype):
            loss = model(**batch)
        with record_function(profiling.BACKWARD):
            backward(loss, scaler, 1)
        with record_function(profiling.OPTIMIZER):
            optimizer_step(model, optimizer, scheduler, scaler, cfg.optim.max_grad_norm)
        return [len(items[i]["input_ids"]) for i in rows]

    for step in range(1, args.warmup + 1):
        train_step(step)
    steps = range(args.warmup + 1, cfg.training.max_steps + 1)
    results = [project_result(args, cfg, *timed_steps(train_step, steps, device), device)]
    if args.second_pass:  # the same batches again: every batch shape has been seen once
        timed, seconds = timed_steps(train_step, steps, device)
        results.append(project_result(args, cfg, timed, seconds, device, second=True))
    profile = None
    if args.profile:
        # The timed steps' batches again (shapes already compiled), after the last warm-up batch.
        replay = [args.warmup + 1 + i % args.steps for i in range(args.profile)]
        profile = profiling.profile_steps(train_step, args.warmup, replay, device, args.profile_trace)
    return results, model, profile  # the optimiser goes with this frame: phase C needs the model only


def timed_steps(train_step, steps: range, device) -> tuple[list[list[int]], list[float]]:
    """Run the steps; each one's row lengths and seconds (its loss.item() waits for the device)."""
    profiling.synchronize(device)
    timed, seconds = [], []
    for step in steps:
        started = time.perf_counter()
        timed.append(train_step(step))
        profiling.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return timed, seconds


def project_result(
    args, cfg: TrainJobConfig, timed: list[list[int]], step_seconds: list[float], device, second: bool = False
) -> Result:
    """Phase B's result from the row lengths of its timed batches."""
    lengths = [n for batch in timed for n in batch]
    compiled = "compiled, " if args.compile else ""
    batches = f"{args.batch_tokens}-token batches" if args.batch_tokens else f"{args.baseline_batch} rows/batch"
    name = "B' the same batches again" if second else f"B  project, {compiled}{batches}"
    return Result(
        name=name,
        steps=args.steps,
        seconds=sum(step_seconds),
        step_seconds=step_seconds,
        rows=len(lengths),
        tokens=sum(lengths),
        padded_tokens=sum(len(batch) * max(batch) for batch in timed),
        flops=sum(flops_per_row(cfg.model, n) for n in lengths),
        peak_gib=peak_memory_gib(device),
    )


def table(results: list[Result], check: dict | None, device_name: str) -> str:
    head = f"{'':44}{'s/step':>8}{'non-pad tok/s':>15}{'padding %':>11}{'MFU %':>8}{'peak GiB':>10}{'rows/step':>11}"
    lines = [f"device: {device_name}", head]
    for r in results:
        mfu = f"{r.mfu_pct:.1f}" if r.mfu_pct is not None else "-"
        lines.append(
            f"{r.name:44}{r.s_per_step:8.3f}{r.tokens_per_s:15,.0f}{r.padding_pct:11.1f}{mfu:>8}"
            f"{r.peak_gib:10.2f}{r.rows / r.steps:11.1f}"
        )
    if len(results) > 1 and results[0].name.startswith("A"):
        for r in results[1:]:
            ratio = r.tokens_per_s / results[0].tokens_per_s
            lines.append(f"speedup (non-pad tok/s, {r.name.split()[0]}/A): {ratio:.2f}x")
    if check:
        verdict = "PASS" if check["agree"] else "FAIL"
        lines.append(
            f"agreement: per-token loss on {check['rows']} rows ({check['tokens']} tokens, mean {check['mean_loss']:.4f}): "
            f"B vs HF max |diff| {check['max_abs_diff']:.2e}, mean {check['mean_abs_diff']:.2e}; "
            f"HF vs itself max {check['hf_vs_itself_max_abs_diff']:.2e}; tolerance {check['tolerance']:.2e} -> {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        # Trainer would wrap the baseline in DataParallel over every visible GPU.
        print("error: one GPU only: run with CUDA_VISIBLE_DEVICES=0", file=sys.stderr)
        return 2
    model_cfg = ModelConfig(source="random", name=args.model_name)
    tokenizer = load_tokenizer(model_cfg)
    items = load_items(args.data, tokenizer, args.max_length)
    cfg = project_config(args, model_cfg, device)  # validates the options before the long phases
    results = [] if args.skip_baseline else [run_baseline(args, model_cfg, items, tokenizer, device)]
    project, model, profile = run_project(args, cfg, items, tokenizer.pad_token_id, device)
    results += project
    check = None
    if args.check_rows:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        rows = items[: args.check_rows]
        budget = args.batch_tokens or args.baseline_batch * args.max_length
        check = agreement.compare(model, rows, tokenizer.pad_token_id, args.baseline_batch, budget, args.seed, dtype)
    tflops = peak_tflops(device, args.peak_tflops)
    for r in results:
        r.finish(tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(table(results, check, device_name))
    if profile:
        print(profiling.format_summary(profile))
    if args.json_out:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device_name, "peak_tflops": tflops}
        report |= {"results": [asdict(r) for r in results], "agreement": check, "profile": profile}
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0 if check is None or check["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
