"""Speed of the training step: what a careful user of transformers runs against this project's step.

    python -m benchmarks.train_step --data ../shared/data/alpaca_en_demo.json --compile      # Mistral-7B shape, 1 GPU
    python -m benchmarks.train_step --compile --batch-tokens 8192 --skip-baseline --json-out bench.json
    python -m benchmarks.train_step --model-name tiny-mistral --data builtin:mobile_health --device cpu --steps 3 \
        --warmup 1 --largest-batches 16                                          # the CPU smoke run
    python -m benchmarks.train_step --skip-baseline --check-rows 0 --profile 3 --profile-trace step.json.gz  # where B's time goes
    python -m benchmarks.train_step --skip-baseline --batch-tokens 0 --grouped-rows   # B on 8 grouped rows: the step alone

In one process on one device, on the same rows (Alpaca prompt + output, truncated at --max-length),
the same base weights (model.source=random, seed 0) and LoRA r=16 on q_proj/v_proj:

  A1-A3. baselines: transformers Trainer, fp16, paged AdamW 32-bit, lr 2e-4 cosine (benchmarks/baselines/hf_trainer.py):
     A1 --baseline-batch rows in random order, padded to the longest (the reference recipe);
     A2 the same rows per batch with transformers' own length grouping (group_by_length);
     A3 the largest of --largest-batches that fits, length-grouped (tried largest first; a size
     that runs out of memory is reported and the next one tried);
  B. the project's step (train/step.py, as the Ray Train workers run it): --batch-tokens
     length-grouped batches, no attention mask, lm_head only on labelled positions, --compile;
  B'. B's batches timed a second time (--no-second-pass skips it): the first visit of a batch shape
     can cost more than later ones (compilation guards, allocator growth, per-shape kernel plans);
  C. per-token losses of B's path against HF's forward on --check-rows rows (benchmarks/agreement.py).

Every phase is timed the same way (benchmarks/train_report.py): --warmup untimed steps, then --steps
steps each timed on its own (the device synchronised at its end); it reports the median step and
its p10-p90 spread, non-padding tokens/s over all timed steps and of the median step, padding, MFU
(LoRA: (4N + 12 L d T) FLOPs per token, N the matmul weights incl. lm_head, T the row's length; fp16
dense peak of the card) and peak memory; speed-ups are quoted against the strongest baseline. Each
phase starts from an empty device (memory freed, peak reset), and --json-out is rewritten after each
phase, so a run cut short keeps what it measured. Exits 1 when C's losses disagree. --profile N then
runs N of B's timed batches again under torch.profiler (benchmarks/profiling.py) and prints the time
per kernel category, per step part and of the top kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.profiler import record_function

from mistral_qa.config import LoraSettings, ModelConfig
from mistral_qa.data import clean_rows, read_rows
from mistral_qa.model import RANDOM_SHAPES, load_tokenizer
from mistral_qa.prompt import build_prompt
from train.batches import GroupedRowsSchedule, TokenBudgetSchedule, micro_batch_indices, step_seed
from train.config import DataConfig, TrainingConfig, TrainJobConfig
from train.optim import build_optimizer, build_scheduler
from train.step import autocast, backward, build_trainable, make_batch, optimizer_step, peak_memory_gib

from . import agreement, profiling
from .baselines import hf_trainer
from .train_report import Result, table

LORA = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"])
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense fp16/bf16
BASELINES = ("padded", "grouped", "largest")


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
        prog="python -m benchmarks.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-name", choices=sorted(RANDOM_SHAPES), default="mistral-7b", help="random-weights shape")
    p.add_argument("--data", default="../shared/data/alpaca_en_demo.json", help="Alpaca rows (file or builtin:...)")
    p.add_argument("--max-length", type=int, default=512, help="truncate rows at this many tokens")
    p.add_argument("--steps", type=positive, default=50, help="timed optimiser steps per phase")
    p.add_argument("--warmup", type=positive, default=10, help="untimed steps first (compilation, allocator, paging)")
    p.add_argument("--baseline-batch", type=positive, default=8, help="rows per batch of A1 and A2")
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="which Trainer baselines to run: padded (A1), grouped (A2), largest (A3); none: B and C only",
    )
    p.add_argument("--skip-baseline", action="store_true", help="no baselines (the same as --baselines alone)")
    p.add_argument(
        "--largest-batches",
        nargs="+",
        type=positive,
        default=[48, 40, 32, 24, 16],
        help="A3's candidate rows per batch, tried largest first until one fits",
    )
    p.add_argument(
        "--batch-tokens",
        type=non_negative,
        default=4096,
        help="token budget of the project's batches (0: --baseline-batch rows per batch, as A1 or with --grouped-rows)",
    )
    p.add_argument(
        "--grouped-rows",
        action="store_true",
        help="with --batch-tokens 0: the --baseline-batch rows of a batch length-grouped (as A2), not shuffled",
    )
    p.add_argument("--compile", action="store_true", help="the project's step with training.compile")
    p.add_argument(
        "--cudnn-attention", action="store_true", help="the project's step with training.cudnn_attention (A/B)"
    )
    p.add_argument("--check-rows", type=non_negative, default=64, help="rows of the per-token loss check (0: skip it)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, help="the card's dense fp16 peak (default: from its name)")
    p.add_argument("--seed", type=int, default=1234, help="data order, LoRA init and dropout")
    p.add_argument("--json-out", type=Path, help="write the results here as JSON (after every phase)")
    p.add_argument(
        "--second-pass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time B's batches a second time (B'): the first visit of a batch shape can cost extra",
    )
    p.add_argument("--profile", type=non_negative, default=0, help="then profile this many of B's steps (0: off)")
    p.add_argument("--profile-trace", type=Path, help="with --profile: write a chrome trace here (.gz: gzipped)")
    args = p.parse_args(argv)
    if args.grouped_rows and args.batch_tokens:
        p.error(f"--grouped-rows needs --batch-tokens 0 (got --batch-tokens {args.batch_tokens})")
    if args.profile_trace and not args.profile:
        p.error("--profile-trace needs --profile N")
    if args.skip_baseline:
        args.baselines = []
    return args


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


def phase_result(name: str, model_cfg: ModelConfig, step_seconds, step_lengths, device, **extra) -> Result:
    """A phase's Result from its timed steps' seconds and row lengths (padded to each batch's longest)."""
    return Result(
        name=name,
        step_seconds=step_seconds,
        step_lengths=step_lengths,
        step_padded=[len(lengths) * max(lengths) for lengths in step_lengths],
        flops=sum(flops_per_row(model_cfg, n) for lengths in step_lengths for n in lengths),
        peak_gib=peak_memory_gib(device),
        **extra,
    )


def run_baselines(args, model_cfg: ModelConfig, items: list[dict], tokenizer, device, done) -> None:
    """A1-A3, each handed to `done` as soon as it is measured."""

    def trainer(batch_size: int, grouped: bool):
        fresh_device(device)
        return hf_trainer.run_trainer(
            model_cfg, LORA, items, tokenizer, batch_size, grouped, args.warmup, args.steps, args.seed, device
        )

    def result(name: str, seconds, batches, **extra) -> Result:
        padded = [n for _, n in batches]  # the collator's padded size: the same as rows x longest
        r = phase_result(name, model_cfg, seconds, [lengths for lengths, _ in batches], device, baseline=True, **extra)
        assert r.step_padded == padded, "the collator padded beyond each batch's longest row"
        return r

    n = args.baseline_batch
    if "padded" in args.baselines:
        done(result(f"A1 Trainer, {n} rows, padded, random order", *trainer(n, grouped=False)))
    if "grouped" in args.baselines:
        done(result(f"A2 Trainer, {n} rows, group_by_length", *trainer(n, grouped=True)))
    if "largest" in args.baselines:
        size, timed, oom = hf_trainer.largest_that_fits(
            args.largest_batches, lambda b: trainer(b, grouped=True), lambda: fresh_device(device)
        )
        done(result(f"A3 Trainer, {size} rows, group_by_length", *timed, notes={"out_of_memory": oom}))


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


def batch_schedule(args, items: list[dict]):
    """The rows of each step's batch: row indices as a function of the (1-based) step."""
    lengths = [len(x["input_ids"]) for x in items]
    if args.batch_tokens or args.grouped_rows:
        grouped = (
            TokenBudgetSchedule(lengths, args.seed, args.batch_tokens)
            if args.batch_tokens
            else GroupedRowsSchedule(lengths, args.seed, args.baseline_batch)
        )
        return lambda step: grouped.micro_batch_indices(step, 0, 1, 1, 0)
    # --baseline-batch rows per batch, as training picks them without training.batch_tokens
    return lambda step: micro_batch_indices(len(items), args.seed, step, 0, 1, args.baseline_batch, 1, 0)


def run_project(args, cfg: TrainJobConfig, items: list[dict], pad_id: int, device, done):
    """The Ray Train worker's step (one worker, one micro-batch per step): B (and B') handed to `done`;
    returns the model for phase C and, with --profile, the profile of the same step."""
    fresh_device(device)
    dtype = torch.float16 if cfg.training.precision == "fp16" else None
    model = build_trainable(cfg, dtype, device)
    optimizer = build_optimizer(cfg.optim, [p for p in model.parameters() if p.requires_grad], device.type == "cuda")
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.training.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is not None)
    batch_rows = batch_schedule(args, items)
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
    done(phase_result(project_name(args), cfg.model, *reversed(timed_steps(train_step, steps, device)), device))
    if args.second_pass:  # the same batches again: every batch shape has been seen once
        again = timed_steps(train_step, steps, device)
        done(phase_result("B' the same batches again", cfg.model, *reversed(again), device))
    profile = None
    if args.profile:
        # The timed steps' batches again (shapes already compiled), after the last warm-up batch.
        replay = [args.warmup + 1 + i % args.steps for i in range(args.profile)]
        profile = profiling.profile_steps(train_step, args.warmup, replay, device, args.profile_trace)
    return model, profile  # the optimiser goes with this frame: phase C needs the model only


def project_name(args) -> str:
    compiled = "compiled, " if args.compile else ""
    if args.batch_tokens:
        return f"B  project, {compiled}{args.batch_tokens}-token batches"
    grouped = ", grouped" if args.grouped_rows else ""
    return f"B  project, {compiled}{args.baseline_batch} rows/batch{grouped}"


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


def versions() -> str:
    import peft
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


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
    tflops = peak_tflops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = f"device: {device_name}; {versions()}; {args.warmup} warm-up + {args.steps} timed steps per phase"
    results: list[Result] = []
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device_name, "versions": versions()}
    report |= {"peak_tflops": tflops, "results": [], "agreement": None, "profile": None}

    def save() -> None:
        report["results"] = [asdict(r) for r in results]
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))

    def done(result: Result) -> None:
        results.append(result.finish(tflops))
        print(table([result], None, f"done: {result.name}"), flush=True)  # a run cut short still shows it
        save()

    run_baselines(args, model_cfg, items, tokenizer, device, done)
    model, report["profile"] = run_project(args, cfg, items, tokenizer.pad_token_id, device, done)
    check = None
    if args.check_rows:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        rows = items[: args.check_rows]
        budget = args.batch_tokens or args.baseline_batch * args.max_length
        check = agreement.compare(model, rows, tokenizer.pad_token_id, args.baseline_batch, budget, args.seed, dtype)
    report["agreement"] = check
    save()
    if report["profile"]:
        print(profiling.format_summary(report["profile"]))
    print(table(results, check, header))  # last: the end of the output is what a lent GPU sends back
    return 0 if check is None or check["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
