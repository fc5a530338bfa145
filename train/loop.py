"""train_loop_per_worker: the only code that runs inside Ray Train workers.

Each worker loads the tokenizer, data and base model, wraps it in LoRA and the training loss
(train/step.py; and in DDP when there are several workers), then trains on its own shard of every
global batch. Every `eval_every` steps all workers evaluate on their shard of the held-out split and
report a checkpoint (written by rank 0) to Ray Train; a restarted or re-run worker group continues
from the latest one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mistral_qa.model import load_tokenizer

from . import deepspeed_setup as ds
from .batches import GroupedRowsSchedule, TokenBudgetSchedule, micro_batch_indices, step_seed
from .checkpoint import load_state, save_state
from .config import TrainJobConfig
from .optim import build_optimizer, build_scheduler
from .prepare import prepare_data
from .report import progress_line
from .step import autocast, backward, build_trainable, make_batch, optimizer_step, peak_memory_gib
from .tracking import IDS_KEY, Trackers, open_trackers

log = logging.getLogger("train")


def batch_schedule(training, lengths: list[int]):
    """The length-grouped batch layout of training.batch_tokens / training.group_by_length, or None
    for batch_size rows in shuffled order (micro_batch_indices)."""
    if training.batch_tokens:
        return TokenBudgetSchedule(lengths, training.seed, training.batch_tokens)
    if training.group_by_length:
        return GroupedRowsSchedule(lengths, training.seed, training.batch_size)
    return None


class InjectedFailure(RuntimeError):
    """Raised on purpose by run.fail_at_step to exercise fault tolerance."""


def resolve_precision(precision: str, on_cuda: bool) -> str:
    if precision == "auto":
        return "fp16" if on_cuda else "fp32"
    return precision


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Worker:
    """The state of one training worker; methods are the steps of the loop."""

    def __init__(self, cfg: TrainJobConfig):
        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(cfg.training.precision, self.device.type == "cuda")
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_items, self.eval_items, report = prepare_data(cfg.data, self.tokenizer)
        if self.rank == 0:
            log.info("data: %s", report.summary())
        self.schedule = batch_schedule(cfg.training, [len(x["input_ids"]) for x in self.train_items])
        self.deepspeed = cfg.training.deepspeed is not None
        self.model = self._build_model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        on_cuda = self.device.type == "cuda"
        if self.deepspeed:  # ZeRO-Offload needs DeepSpeed's CPU Adam instead of optim.name
            self.optimizer = ds.make_optimizer(cfg, params, on_cuda)
        else:
            self.optimizer = build_optimizer(cfg.optim, params, on_cuda)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, cfg.training.max_steps)
        # Under DeepSpeed the engine does the loss scaling; the (disabled) scaler only keeps the
        # checkpoint layout of the DDP path.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16" and not self.deepspeed)
        if self.deepspeed:
            self.model, self.optimizer, self.scheduler = ds.build_engine(
                cfg, self.model, self.optimizer, self.scheduler, self.precision, self.world
            )
        self.step, self.history, self.resumed = 0, [], False

    def _build_model(self):
        # Frozen base in the compute dtype (fp16 weights under fp16 autocast); LoRA weights in fp32.
        model = build_trainable(self.cfg, self.amp_dtype, self.device)
        if self.world > 1 and not self.deepspeed:  # DeepSpeed's engine replaces DDP
            return ray.train.torch.prepare_model(model, move_to_device=False)
        return model

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            if self.deepspeed:
                self.step, self.history = ds.load(Path(folder), self.model, self.scaler)
            else:
                self.step, self.history = load_state(
                    Path(folder), self.model, self.optimizer, self.scheduler, self.scaler
                )
        self.resumed = True
        if self.rank == 0:
            log.info("resumed from checkpoint at step %d", self.step)

    def _batch(self, indices: list[int], items: list[dict]) -> dict:
        return make_batch([items[i] for i in indices], self.tokenizer.pad_token_id, self.device)

    def _loss(self, batch: dict) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return self.model(**batch)

    def _rows(self, micro: int) -> list[int]:
        """This worker's rows for micro-batch `micro` of the coming step."""
        cfg, step = self.cfg.training, self.step + 1
        if self.schedule is not None:
            return self.schedule.micro_batch_indices(step, micro, cfg.grad_accum, self.world, self.rank)
        n_rows = len(self.train_items)
        return micro_batch_indices(n_rows, cfg.seed, step, micro, cfg.grad_accum, cfg.batch_size, self.world, self.rank)

    def train_step(self) -> dict:
        cfg, t = self.cfg.training, time.monotonic()
        self.model.train()
        torch.manual_seed(step_seed(cfg.seed, self.step + 1, self.rank))
        loss_sum, tokens, nonpad = 0.0, 0, 0
        lr = self.scheduler.get_last_lr()[0]  # the lr this step uses (DeepSpeed steps the schedule inside)
        for micro in range(cfg.grad_accum):
            idx = self._rows(micro)
            batch = self._batch(idx, self.train_items)
            loss_sum += self._backward(self._loss(batch))
            tokens += batch["input_ids"].numel()
            nonpad += sum(len(self.train_items[i]["input_ids"]) for i in idx)
        self._optimizer_step()
        self.step += 1
        loss_sum, tokens, nonpad = _all_reduce([loss_sum, tokens, nonpad], self.device)
        elapsed = time.monotonic() - t
        return {
            "step": self.step,
            "train_loss": loss_sum / self.world,
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
            "nonpad_tokens_per_s": nonpad / elapsed,
            "peak_memory_gib": peak_memory_gib(self.device),
        }

    def _backward(self, loss: torch.Tensor) -> float:
        """Backward of one micro-batch's mean loss; returns its share of the step's loss."""
        if self.deepspeed:
            # The engine divides by grad_accum itself and steps at the accumulation boundary.
            ds.train_micro(self.model, loss)
            return (loss / self.cfg.training.grad_accum).item()
        return backward(loss, self.scaler, self.cfg.training.grad_accum)

    def _optimizer_step(self) -> None:
        if self.deepspeed:
            return  # done by the engine in the last micro-batch's train_micro
        optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.cfg.optim.max_grad_norm)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted loss over this worker's shard of the eval split, summed over all workers."""
        self.model.eval()
        cfg = self.cfg.training
        shard = list(range(self.rank, len(self.eval_items), self.world))
        chunks = [shard[i : i + cfg.batch_size] for i in range(0, len(shard), cfg.batch_size)]
        if cfg.eval_batches:
            chunks = chunks[: cfg.eval_batches]
        forwards = [(c, True) for c in chunks]
        if self.deepspeed:
            forwards = ds.eval_chunks(chunks, len(self.eval_items), self.world, cfg.batch_size, cfg.eval_batches)
        loss_sum, count = 0.0, 0
        for idx, counted in forwards:
            batch = self._batch(idx, self.eval_items)
            n = int((batch["labels"][:, 1:] != -100).sum()) * counted
            loss_sum += self._loss(batch).item() * n
            count += n
        loss_sum, count = _all_reduce([loss_sum, count], self.device)
        return loss_sum / max(count, 1)

    def checkpoint_and_report(self, record: dict) -> None:
        """Every worker reports (Ray's report is a barrier); rank 0 attaches the checkpoint, or under
        DeepSpeed every rank attaches its own files of the same checkpoint folder."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.deepspeed:
                seed = self.cfg.training.seed
                ds.save(Path(folder), self.model, self.scheduler, self.scaler, self.step, seed, self.history, self.rank)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            elif self.rank == 0:
                save_state(
                    Path(folder),
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    self.scaler,
                    self.step,
                    self.cfg.training.seed,
                    self.history,
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(record, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{self.step:06d}")

    def maybe_fail(self) -> None:
        fail_at = self.cfg.run.fail_at_step
        if fail_at == self.step and not self.resumed and self.rank == min(1, self.world - 1):
            raise InjectedFailure(f"run.fail_at_step={fail_at}: worker {self.rank} fails on purpose")


def train_loop_per_worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = dict(config)
    tracking_ids = config.pop(IDS_KEY, {})  # resolved by the driver (train/tracking.py: open_runs)
    cfg = TrainJobConfig.model_validate(config)
    worker = Worker(cfg)
    worker.restore()
    tracker = open_trackers(cfg, tracking_ids, worker.step + 1) if worker.rank == 0 else None
    try:
        train(worker, tracker)
    finally:
        if tracker is not None:
            tracker.close()


def train(worker: Worker, tracker: Trackers | None) -> None:
    """Steps from the restored position to max_steps; rank 0 logs each one (tracker: rank 0 only)."""
    tc = worker.cfg.training
    started, first_step = time.monotonic(), worker.step + 1
    while worker.step < tc.max_steps:
        record = worker.train_step()
        worker.maybe_fail()
        if worker.step % tc.eval_every == 0 or worker.step == tc.max_steps:
            record["eval_loss"] = worker.evaluate()
        worker.history.append(record)
        if tracker is not None:
            tracker.log(record)
        if worker.rank == 0 and (worker.step % tc.log_every == 0 or "eval_loss" in record):
            line = progress_line(worker.step, tc.max_steps, record, started, first_step)
            log.info(line + (f" | eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
        if "eval_loss" in record:
            worker.checkpoint_and_report(record)
