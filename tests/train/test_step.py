"""The training step (train/step.py) on the tiny random Mistral, CPU, no Ray: the mask-free,
label-only loss gives HF's per-token losses and gradients, DDP syncs its gradients, and compiled
decoder layers give the eager results."""

from __future__ import annotations

import pytest
import torch

from benchmarks.agreement import seed_lora_b
from mistral_qa.data import IGNORE_INDEX, collate
from train.config import TrainJobConfig
from train.step import CausalLMLoss, autocast, build_trainable, compile_decoder_layers, make_batch

LENGTHS = (7, 19, 3, 12)


def tiny_trainable(dtype: torch.dtype | None = None, **training) -> CausalLMLoss:
    """The tiny Mistral + LoRA as the loop builds it, with nonzero LoRA B so the adapter shapes the logits."""
    cfg = TrainJobConfig.model_validate(
        {"model": {"source": "random", "name": "tiny-mistral"}, "lora": {"r": 8, "dropout": 0.0}, "training": training}
    )
    model = build_trainable(cfg, dtype, torch.device("cpu"))
    seed_lora_b(model.peft_model, seed=0)
    return model


def rows(lengths=LENGTHS, prompt: int = 2, seed: int = 0) -> list[dict]:
    """Random token rows whose first `prompt` tokens carry no label (as with data.loss_on=response)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 32000, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def lora_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_right_padding_needs_no_attention_mask():
    peft = tiny_trainable().peft_model.eval()
    batch = collate(rows(), pad_id=0)
    with torch.no_grad():
        masked = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unmasked = peft(input_ids=batch["input_ids"]).logits
        real = batch["attention_mask"].bool()
        assert (~real).any()  # the batch has pads
        torch.testing.assert_close(unmasked[real], masked[real], rtol=0, atol=1e-5)
        # The test can tell: left padding without the mask lets real tokens attend to the pads.
        left = {k: v.flip(1) for k, v in batch.items()}
        masked_left = peft(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
        unmasked_left = peft(input_ids=left["input_ids"]).logits
        real_left = left["attention_mask"].bool()
        assert not torch.allclose(unmasked_left[real_left], masked_left[real_left], atol=1e-3)


def test_label_only_loss_equals_hf_loss_and_gradients():
    model = tiny_trainable()
    batch = collate(rows(), pad_id=0)
    hf_loss = model.peft_model(**batch).loss  # full logits, attention mask, HF's shift and mean
    hf_loss.backward()
    hf_grads = lora_grads(model)
    model.zero_grad()
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"])  # no mask, lm_head on labels only
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(lora_grads(model), hf_grads, rtol=1e-4, atol=1e-6)
    n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert model.token_losses(batch["input_ids"], batch["labels"]).shape == (n_labels,)
    assert n_labels < batch["input_ids"].numel() - len(LENGTHS)  # pads and prompt tokens were skipped


def test_lora_inputs_stay_in_the_compute_dtype_under_autocast():
    """The skipped fp32 upcast of LoRA inputs changes nothing under autocast (bf16 on CPU here)."""
    batch = make_batch(rows(), pad_id=0, device=torch.device("cpu"))
    fast = tiny_trainable(torch.bfloat16).eval()
    upcast = tiny_trainable(torch.bfloat16).eval()
    for module in upcast.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = True  # PEFT's default
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        torch.testing.assert_close(fast.token_losses(**batch), upcast.token_losses(**batch), rtol=0, atol=0)
    assert not fast.peft_model.base_model.model.model.layers[0].self_attn.q_proj.cast_input_dtype_enabled


def _ddp_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_trainable()
    ddp = DistributedDataParallel(model)
    batch = make_batch(rows(seed=rank), pad_id=0, device=torch.device("cpu"))
    ddp(**batch).backward()
    torch.save(lora_grads(model), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_ddp_syncs_the_gradients_of_the_loss_module(tmp_path):
    """Two gloo ranks with different rows end with the same gradients: the mean of their own."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    synced = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    own = []
    for rank in range(2):
        model = tiny_trainable()
        model(**make_batch(rows(seed=rank), pad_id=0, device=torch.device("cpu"))).backward()
        own.append(lora_grads(model))
    assert not torch.allclose(own[0], own[1])
    torch.testing.assert_close(synced[0], synced[1], rtol=0, atol=0)
    torch.testing.assert_close(synced[0], (own[0] + own[1]) / 2, rtol=1e-4, atol=1e-7)


def compiled_matches_eager(backend: str) -> None:
    import torch._dynamo.utils as dynamo_utils

    eager, compiled = tiny_trainable(), tiny_trainable()
    assert compile_decoder_layers(compiled.peft_model, backend) == 2
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    graphs = []
    for lengths in (LENGTHS, (20, 5)):  # a second batch shape must not compile again
        batch = make_batch(rows(lengths), pad_id=0, device=torch.device("cpu"))
        for model in (eager, compiled):
            model.zero_grad()
            model(**batch).backward()
        torch.testing.assert_close(compiled(**batch), eager(**batch), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora_grads(compiled), lora_grads(eager), rtol=1e-4, atol=1e-5)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    # One graph for the first layer (its input needs no grad), one shared by the others; none added
    # for the second shape.
    assert graphs[0] == graphs[1] == 2, graphs


def test_compiled_layers_trace_once_and_match_eager():
    """Dynamo's tracing of the decoder layers (dynamic shapes, shared code) with the aot_eager backend:
    fast on CPU; inductor's code generation is the slow test below and the GPU benchmark."""
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_layers_match_eager():
    compiled_matches_eager("inductor")
