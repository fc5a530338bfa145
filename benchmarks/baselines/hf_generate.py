"""Plain transformers on the same random-weight model: `model.generate` greedy at batch 1 (decode
ms per token, TTFT) and at batch B (tok/s), and `model.generate_batch` (transformers' continuous
batching, where the installed version has it) for R requests (tok/s)."""

from __future__ import annotations

import inspect
import time

import torch
from transformers.generation.streamers import BaseStreamer

from mistral_qa.config import ModelConfig
from mistral_qa.engine.loading import pick_dtype  # as the engine picks it
from mistral_qa.model import load_base_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TokenClock(BaseStreamer):
    """Records when each new token reaches the host (generate's streamer sees the prompt first)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def greedy_kwargs(tokenizer, new_tokens: int) -> dict:
    # min_new_tokens = max_new_tokens: every row makes exactly new_tokens (random weights may pick EOS).
    return dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )


@torch.inference_mode()
def generate_single(model, tokenizer, prompt: str, new_tokens: int) -> dict:
    device = model.device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    model.generate(ids, **greedy_kwargs(tokenizer, 4))  # warm-up: kernels, cuBLAS handles
    clock = TokenClock()
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, streamer=clock, **greedy_kwargs(tokenizer, new_tokens))
    _sync(device)
    made = out.shape[1] - ids.shape[1]
    decode = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1) * 1000 if len(clock.times) > 1 else None
    return {
        "prompt_tokens": ids.shape[1],
        "output_tokens": made,
        "decode_ms_per_token": decode,
        "ttft_ms": (clock.times[0] - start) * 1000 if clock.times else None,
        "ms_per_token_overall": (time.perf_counter() - start) / made * 1000,
    }


@torch.inference_mode()
def generate_padded_batch(model, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    device = model.device
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    model.generate(**batch, **greedy_kwargs(tokenizer, 2))  # warm-up at this batch shape
    _sync(device)
    start = time.perf_counter()
    out = model.generate(**batch, **greedy_kwargs(tokenizer, new_tokens))
    _sync(device)
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return {"batch": len(prompts), "output_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def generate_continuous(model, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    """transformers' continuous batching; the timed span excludes its warm-up when the outputs carry
    their own timestamps (created_time, lifespan), else it is the whole call. Not under inference_mode:
    its generation thread updates tensors made here in place."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers has no generate_batch"}
    inputs = [tokenizer(p)["input_ids"] for p in prompts]
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    accepted = inspect.signature(model.generate_batch).parameters
    extra = {k: v for k, v in {"progress_bar": False}.items() if k in accepted}
    _sync(model.device)
    start = time.perf_counter()
    outputs = list(model.generate_batch(inputs, generation_config=config, **extra).values())
    _sync(model.device)
    wall = time.perf_counter() - start
    errors = [o.error for o in outputs if getattr(o, "error", None)]
    if len(errors) == len(outputs):
        return {"skipped": f"generate_batch: every request failed ({str(errors[0])[:200]})"}
    tokens = sum(len(o.generated_tokens) for o in outputs)
    result = {"requests": len(prompts), "finished": len(outputs), "failed": len(errors), "output_tokens": tokens}
    result.update(wall_s=wall, tok_s_whole_call=tokens / wall)
    span = _generation_span(outputs)
    result.update(generation_s=span, tok_s=tokens / span if span else tokens / wall)
    return result


def _generation_span(outputs) -> float | None:
    try:
        created = min(o.created_time for o in outputs)
        finished = max(o.lifespan[1] for o in outputs)
    except (AttributeError, TypeError, IndexError, ValueError):
        return None
    return finished - created if finished > created > 0 else None


def run_hf_baselines(
    model_cfg: ModelConfig,
    tokenizer,
    prompts: list[str],
    device: torch.device,
    dtype: str,
    new_tokens: int,
    batch: int,
    cb_requests: int,
    log,
) -> dict:
    model = load_base_model(model_cfg, pick_dtype(dtype, device), device).eval()
    results: dict = {"new_tokens": new_tokens}
    try:
        results["batch1"] = generate_single(model, tokenizer, prompts[0], new_tokens)
        log(f"hf generate batch 1: {results['batch1']}")
        cycled = [prompts[i % len(prompts)] for i in range(max(batch, cb_requests))]
        results["batch"] = generate_padded_batch(model, tokenizer, cycled[:batch], new_tokens)
        log(f"hf generate batch {batch}: {results['batch']}")
        if cb_requests:
            try:
                results["continuous"] = generate_continuous(model, tokenizer, cycled[:cb_requests], new_tokens)
            except Exception as err:  # a transformers version whose generate_batch fails here: report, go on
                results["continuous"] = {"skipped": f"generate_batch failed: {type(err).__name__}: {err}"[:300]}
            log(f"hf generate_batch {cb_requests} requests: {results['continuous']}")
    finally:
        del model
    return results
