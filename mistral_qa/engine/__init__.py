"""The generation engine shared by serving and the batch job.

    from mistral_qa.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(adapters={"mobile-health": "outputs/quickstart/adapter"}))
    prompt = build_prompt("Does phone use before bed hurt sleep?")
    [answer] = engine.generate([prompt], SamplingParams(), template_stop=STOP_STRINGS)  # "\n###"

Layout, top down (vLLM's EngineCore -> Scheduler -> ModelRunner):
  core (Engine: the public API) -> engine_thread (the step loop's thread, health) -> runner
  (StepRunner: carries out each step's plans, samples, stops, streams) -> scheduler (which request
  runs in which cache slot: DecodePlan, AdmissionPlan, SlotMove; "row i is slot i" lives there)
  -> decoder (SlotDecoder: packed prefill, chunked prefill, decode) -> wiring (the Llama-family
  layers over the model's modules; LayerDims, LayerTables) · attention (sdpa/flex decode, packed
  varlen and per-prompt prefill, chunk) · kv_cache (KVCache) · lora_rows (adapters per row).
  Beside them: config (EngineSettings, EngineConfig) · request (SamplingParams, Completion, Delta, Request) ·
  loading (base + adapters) · support (the model families it runs, by model_type) · graphs (decode
  step shapes, CUDA graphs) · sampling (penalties, top_k/top_p, logprobs) · grammar (structured
  output) · textstream (detokenising, stop strings) · stats (where the step loop's time goes) · errors.
Hooks for tests and measurements: Engine.runner, Engine.model, Engine.engine_thread (see core).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .config import BASE_NAME, EngineConfig, EngineSettings
from .errors import Cancelled, EngineError, EngineFailure, InvalidParameter, PromptTooLong, UnknownModel

if TYPE_CHECKING:
    from .core import Engine
    from .request import Completion, Delta, Request, SamplingParams, TokenLogprob

# The engine proper (torch and the model stack) loads on first use: the batch job's config reads
# mistral_qa.engine.config, and its driver validates that config, refusing a bad one, without importing torch.
_LAZY = {
    "Engine": "core",
    "Completion": "request",
    "Delta": "request",
    "Request": "request",
    "SamplingParams": "request",
    "TokenLogprob": "request",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "BASE_NAME",
    "Cancelled",
    "Completion",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineFailure",
    "EngineSettings",
    "InvalidParameter",
    "PromptTooLong",
    "Request",
    "SamplingParams",
    "TokenLogprob",
    "UnknownModel",
]
