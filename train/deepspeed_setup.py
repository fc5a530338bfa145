"""DeepSpeed ZeRO for the training loop: the engine, its train step, and its checkpoints.

Used instead of DDP when training.deepspeed is set. The engine wraps the PEFT model together with the
optimiser and LambdaLR built by train/optim.py (a "client" optimiser), so the lr schedule, clipping and
accumulation match the DDP path. Checkpoints keep the DDP layout for the parts other code reads
(adapter/ and trainer_state.pt's history) and add deepspeed/, which holds the ZeRO-partitioned
optimiser state: every rank writes its own shard files into its own temp folder and reports them
under the same checkpoint_dir_name; Ray Train V2 copies each rank's files into that one folder
(StorageContext.persist_current_checkpoint: create_dir + copy_files, no cleanup of other ranks' files).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from .checkpoint import ADAPTER_DIR, STATE_FILE, unwrap, write_trainer_state
from .config import TrainJobConfig
from .optim import build_optimizer

log = logging.getLogger("train")

DS_DIR = "deepspeed"
DS_TAG = "state"  # one fixed tag: each Ray checkpoint folder holds exactly one DeepSpeed save


def ds_config(cfg: TrainJobConfig, precision: str, world: int) -> dict:
    """The DeepSpeed config dict; batch sizes are per worker, as in the DDP path."""
    tc, ds = cfg.training, cfg.training.deepspeed
    zero: dict = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * world,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        # loss_scale 0 = DeepSpeed's dynamic loss scaling (it replaces torch's GradScaler).
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        "bf16": {"enabled": precision == "bf16"},
        # bitsandbytes / torch AdamW are not on DeepSpeed's tested list; ZeRO works with any
        # torch.optim.Optimizer whose state is per parameter, which both are.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the loop prints its own progress lines
        "wall_clock_breakdown": False,
    }


def make_optimizer(cfg: TrainJobConfig, params: list[torch.nn.Parameter], on_cuda: bool) -> torch.optim.Optimizer:
    """The client optimiser; ZeRO-Offload steps on the CPU and needs DeepSpeed's CPU Adam kernel."""
    if not cfg.training.deepspeed.offload_optimizer:
        return build_optimizer(cfg.optim, params, on_cuda)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    o = cfg.optim
    log.info("deepspeed offload_optimizer: using DeepSpeedCPUAdam (AdamW) instead of optim.name=%s", o.name)
    return DeepSpeedCPUAdam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, adamw_mode=True)


def build_engine(cfg: TrainJobConfig, model, optimizer, scheduler, precision: str, world: int):
    """(engine, zero optimiser, scheduler): the engine replaces DDP and steps optimiser and scheduler."""
    import deepspeed

    # Ray Train has already set up torch.distributed (gloo on CPU, NCCL on GPU); DeepSpeed reuses it.
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config(cfg, precision, world),
        dist_init_required=False,
    )
    return engine, ds_optimizer, ds_scheduler


def train_micro(engine, loss: torch.Tensor) -> None:
    """Backward + step of one micro-batch. DeepSpeed divides the loss by grad_accum itself and only
    clips, steps the optimiser and the lr scheduler at the accumulation boundary."""
    engine.backward(loss)
    engine.step()


def _gathered(engine):
    """All LoRA params whole on every rank (ZeRO-3 partitions them); a no-op below stage 3.
    A collective: every rank must enter it."""
    if engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save(folder: Path, engine, scheduler, scaler, step: int, seed: int, history: list[dict], rank: int) -> None:
    """Every rank calls this (DeepSpeed's save and the ZeRO-3 gather are collectives); rank 0 writes
    the adapter and trainer_state.pt, every rank its own optimiser shard under deepspeed/."""
    folder = Path(folder)
    with _gathered(engine):
        if rank == 0:
            unwrap(engine).save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    if rank == 0:
        # No "optimizer" key: the optimiser lives in deepspeed/ (partitioned per rank).
        state = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
        write_trainer_state(folder, state, step, seed, history)
    (folder / DS_DIR).mkdir(parents=True, exist_ok=True)  # DeepSpeed creates it on rank 0 only
    # The frozen base is rebuilt from the model config; saving it would copy the whole base model.
    engine.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)


def load(folder: Path, engine, scaler) -> tuple[int, list[dict]]:
    """Restore what save wrote: LoRA weights, optimiser shard and lr schedule (all inside DeepSpeed's
    checkpoint), then step and history. Every rank calls it and reads its own shard."""
    folder = Path(folder)
    if not (folder / DS_DIR / DS_TAG).is_dir():
        raise RuntimeError(f"{folder} was not written with training.deepspeed; it cannot resume a DeepSpeed run")
    # Non-strict: the checkpoint holds only the trainable (LoRA) weights, the base comes from the config.
    path, _ = engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / DS_DIR}")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    scaler.load_state_dict(state["scaler"])
    return int(state["step"]), list(state["history"])


def eval_chunks(chunks: list[list[int]], n_items: int, world: int, batch_size: int, cap: int | None):
    """(indices, counted) per eval forward, padded to the same number of forwards on every rank: under
    ZeRO-3 each forward all-gathers parameters, so a rank with one chunk fewer would hang the others."""
    per_rank = -(-n_items // world)  # rank 0 has the most items
    most = -(-per_rank // batch_size)
    most = min(most, cap) if cap else most
    filler = chunks[0] if chunks else [0]
    return [(c, True) for c in chunks] + [(filler, False)] * (most - len(chunks))  # filler loss is ignored
