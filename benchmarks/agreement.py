"""Per-token losses of the project's step against HF's, on the same rows with the same weights.

The project's path (train/step.py: length-grouped batches, no attention mask, lm_head only where
there is a label, compiled layers when they are) and HF's usual forward (rows padded to the longest
of a fixed-size batch, with the attention mask, full logits, eager) score every labelled token of the
same rows. Their difference is set against HF's own: the same HF forward with each row alone (no
padding), which shows how far kernels and batch shapes move the losses at this precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistral_qa.data import IGNORE_INDEX, collate
from train.batches import TokenBudgetSchedule
from train.step import CausalLMLoss, autocast, make_batch

ABS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def labelled(item: dict) -> int:
    """How many next-token losses a row has (labelled positions after the first)."""
    return sum(label != IGNORE_INDEX for label in item["labels"][1:])


def seed_lora_b(peft_model, seed: int, std: float = 0.02) -> None:
    """LoRA B starts at zero, which would hide the adapter path: give it seeded nonzero values."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * std)


def hf_row_losses(peft_model, items: list[dict], pad_id: int, batch_size: int, device) -> list[torch.Tensor]:
    """Per-token losses of each row from HF's forward: padded batches of `batch_size` rows, with the mask."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        for row, item in enumerate(chunk):
            n = len(item["input_ids"])
            targets = batch["labels"][row, 1:n]
            losses = F.cross_entropy(logits[row, : n - 1], targets, reduction="none")
            out.append(losses[targets != IGNORE_INDEX].cpu())
    return out


def project_row_losses(model: CausalLMLoss, items: list[dict], pad_id: int, budget: int, seed: int, device):
    """Per-token losses of each row from the project's step on its own length-grouped batches."""
    out: list[torch.Tensor | None] = [None] * len(items)
    schedule = TokenBudgetSchedule([len(x["input_ids"]) for x in items], seed, budget)
    for rows in schedule.epoch(0):
        batch = make_batch([items[i] for i in rows], pad_id, device)
        losses = model.token_losses(**batch).cpu()
        for row, part in zip(rows, losses.split([labelled(items[i]) for i in rows])):
            out[row] = part
    return out


def _max_mean(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    diff = (torch.cat(a) - torch.cat(b)).abs()
    return diff.max().item(), diff.mean().item()


@torch.no_grad()
def compare(model: CausalLMLoss, items: list[dict], pad_id: int, batch_size: int, budget: int, seed: int, dtype):
    """Max/mean |difference| of per-token losses (project vs HF, and HF alone vs HF batched) and a verdict."""
    device = next(model.parameters()).device
    seed_lora_b(model.peft_model, seed)
    model.eval()
    with autocast(device, dtype if dtype != torch.float32 else None):
        ours = project_row_losses(model, items, pad_id, budget, seed, device)
        with torch.compiler.set_stance("force_eager"):  # HF's path as HF runs it, whether or not layers are compiled
            reference = hf_row_losses(model.peft_model, items, pad_id, batch_size, device)
            alone = hf_row_losses(model.peft_model, items, pad_id, 1, device)
    assert [len(x) for x in ours] == [len(x) for x in reference], "the two paths scored different tokens"
    max_diff, mean_diff = _max_mean(ours, reference)
    floor_max, floor_mean = _max_mean(alone, reference)
    tolerance = max(ABS_TOLERANCE[dtype], 2 * floor_max)
    return {
        "rows": len(items),
        "tokens": sum(len(x) for x in reference),
        "mean_loss": torch.cat(reference).mean().item(),
        "max_abs_diff": max_diff,
        "mean_abs_diff": mean_diff,
        "hf_vs_itself_max_abs_diff": floor_max,
        "hf_vs_itself_mean_abs_diff": floor_mean,
        "tolerance": tolerance,
        "agree": max_diff <= tolerance,
    }
