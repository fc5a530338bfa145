"""The usual transformers recipe, timed step by step: the baseline of benchmarks/train_step.py.

`transformers.Trainer` + PEFT LoRA with the reference settings: fp16 mixed precision on CUDA (fp32
on CPU), optim="paged_adamw_32bit", lr 2e-4 cosine, a fixed number of rows per batch padded to the
longest row (DataCollatorForLanguageModeling: right padding, attention mask, pads labelled -100),
no packing. With `grouped`, transformers' own length grouping (TrainingArguments
train_sampling_strategy="group_by_length", transformers 5.x; `group_by_length=True` in 4.x):
LengthGroupedSampler sorts megabatches of 50 batches by length and puts the longest batch first, so
a batch size that does not fit runs out of memory at the first step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from mistral_qa.config import LoraSettings, ModelConfig
from mistral_qa.model import add_lora, load_base_model


class CountingCollator:
    """The HF collator, recording each batch's row lengths and padded size in the order it collates.

    Batch i of the list is the batch of optimiser step i + 1 (one micro-batch per step), however far
    ahead the data loader prefetches.
    """

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[list[int], int]] = []

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator([{"input_ids": f["input_ids"]} for f in features])
        self.batches.append((batch["attention_mask"].sum(dim=1).tolist(), batch["input_ids"].numel()))
        return batch


def _step_timer(device: torch.device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """The wall-clock time at the end of every optimiser step, after the device has finished it."""

        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.ends.append(time.perf_counter())

    return StepTimer()


def _arguments(output_dir: str, batch_size: int, grouped: bool, max_steps: int, seed: int, device: torch.device):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        train_sampling_strategy="group_by_length" if grouped else "random",
        max_steps=max_steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        optim="paged_adamw_32bit",
        max_grad_norm=0.3,  # as the project's configs; clipping costs the same either way
        fp16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        seed=seed,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def run_trainer(
    model_cfg: ModelConfig,
    lora: LoraSettings,
    items: list[dict],
    tokenizer,
    batch_size: int,
    grouped: bool,
    warmup: int,
    steps: int,
    seed: int,
    device: torch.device,
) -> tuple[list[float], list[tuple[list[int], int]]]:
    """Train `warmup + steps` steps; returns the seconds of each of the last `steps` steps and, for each
    of them, (row lengths, padded tokens) of its batch."""
    from transformers import DataCollatorForLanguageModeling, Trainer

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    model = add_lora(load_base_model(model_cfg, dtype, device), lora)  # PEFT keeps LoRA weights in fp32
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    timer = _step_timer(device)
    with tempfile.TemporaryDirectory() as out:
        args = _arguments(out, batch_size, grouped, warmup + steps, seed, device)
        trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=collator, callbacks=[timer])
        trainer.train()
    ends = timer.ends
    step_seconds = [ends[i] - ends[i - 1] for i in range(warmup, warmup + steps)]
    return step_seconds, collator.batches[warmup : warmup + steps]


def largest_that_fits(sizes: Sequence[int], run: Callable[[int], object], cleanup: Callable[[], None]):
    """Run `run(size)` for each size, largest first, until one does not run out of device memory.

    Returns (size, its result, the sizes that ran out of memory). `cleanup` runs after each failure,
    outside the except block, so the failed run's traceback (which holds its model) is gone by then.
    """
    out_of_memory = []
    for size in sorted(sizes, reverse=True):
        try:
            return size, run(size), out_of_memory
        except torch.OutOfMemoryError:
            out_of_memory.append(size)
        cleanup()
    raise torch.OutOfMemoryError(f"no batch size of {sorted(sizes)} fits on the device")
