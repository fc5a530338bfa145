"""One training step without Ray: the trainable module, the batch, the loss, backward, optimiser step.

Used by the Ray Train workers (train/loop.py) and by the speed benchmark (benchmarks/train_step.py), so the
benchmark times the code that trains. What makes it fast without changing what is learned:

- Batches are right-padded and reach the model WITHOUT an attention mask. Under causal attention a
  token never sees the positions to its right, so a real token's logits are those it gets with the
  mask, and SDPA may use its flash kernel (it cannot with a mask). Pads carry label -100.
- The loss runs the decoder, then lm_head and cross-entropy only at positions that have a label: not on
  pads, nor on prompt tokens when data.loss_on=response. The mean is HF's (mean over labelled tokens).
- PEFT casts each LoRA layer's input to the fp32 LoRA weights' dtype; under autocast the LoRA matmuls
  run in fp16/bf16 anyway, so that cast only adds a copy and an fp32 dropout per layer: it is skipped.
- Attention avoids cuDNN's SDPA kernels unless training.cudnn_attention: PyTorch picks them first on
  Hopper GPUs, and cuDNN builds an execution plan for every new (rows, length) shape, which
  length-grouped batches bring at almost every step. The step runs as fast either way (BENCHMARKS.md,
  "Training speed", session 4); flash attention is kept as the default that has no per-shape cost.
- training.compile compiles each decoder layer (regional compilation: every layer runs the same code,
  compiled once, with dynamic batch and sequence sizes), which fuses the norms, rotary embedding,
  SwiGLU, LoRA dropout/scaling and residual adds into few kernels.
"""

from __future__ import annotations

import contextlib
import logging
import resource

import torch
import torch.nn.functional as F

from mistral_qa.data import IGNORE_INDEX, collate
from mistral_qa.model import add_lora, load_base_model

from .config import TrainJobConfig

log = logging.getLogger("train")


class CausalLMLoss(torch.nn.Module):
    """Mean next-token cross-entropy of a PEFT causal LM over the labelled positions only.

    The loss is this module's forward, so that DDP and DeepSpeed, which wrap it, see the whole
    computation: DDP only syncs gradients of a forward that went through its own wrapper.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def token_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every labelled position, in row-major order (fp32)."""
        lm = self.peft_model.get_base_model()
        hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="none")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.token_losses(input_ids, labels).mean()


def skip_lora_input_upcast(peft_model) -> None:
    """Keep LoRA inputs in the compute dtype (see the module docstring); only valid under autocast."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False


def compile_decoder_layers(peft_model, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place; returns how many.

    Every layer runs the same code, so dynamo compiles it once for all of them (parameters are graph
    inputs) and again only where guards differ: the first layer's input needs no grad, eval runs without
    grad, and a one-row batch specialises size 1. dynamic=True makes batch and sequence sizes symbolic
    from the first compile, so length-grouped batches of any shape reuse the same kernels.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    layers = peft_model.get_base_model().get_decoder().layers
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def build_trainable(cfg: TrainJobConfig, dtype: torch.dtype | None, device: torch.device) -> CausalLMLoss:
    """The frozen base in `dtype` (fp32 when None) with fresh fp32 LoRA weights, wrapped in the loss."""
    torch.manual_seed(cfg.training.seed)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cfg.training.cudnn_attention)  # the process's attention (docstring)
    base = load_base_model(cfg.model, dtype or torch.float32, device)
    model = add_lora(base, cfg.lora, cfg.training.gradient_checkpointing)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the optimiser updates fp32 LoRA weights; autocast casts them per matmul
    if dtype is not None:
        skip_lora_input_upcast(model)
    if cfg.training.compile:
        log.info("training.compile: compiled %d decoder layers", compile_decoder_layers(model))
    return CausalLMLoss(model)


def make_batch(items: list[dict], pad_id: int, device: torch.device) -> dict:
    """input_ids and labels, right-padded to the longest row; no attention mask (see the module docstring)."""
    batch = collate(items, pad_id)
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels")}


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler, grad_accum: int) -> float:
    """Backward of one micro-batch's mean loss; returns its share of the step's loss."""
    loss = loss / grad_accum
    scaler.scale(loss).backward()
    return loss.item()


def optimizer_step(model, optimizer, scheduler, scaler: torch.amp.GradScaler, max_grad_norm: float) -> None:
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
