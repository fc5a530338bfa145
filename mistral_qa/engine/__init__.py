"""The generation engine shared by serving and the batch job.

    from mistral_qa.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(adapters={"mobile-health": "outputs/quickstart/adapter"}))
    [answer] = engine.generate([build_prompt("Does phone use before bed hurt sleep?")], SamplingParams())

Layout: config (EngineConfig) · request (SamplingParams, Completion, Delta, Request) · loading
(base + adapters) · support (the model families it runs, by model_type) · decoder (the model's
forward over a slot KV cache; packed and chunked prefill) · lora_rows (adapters per row) · graphs
(decode steps, CUDA graphs) · sampling (penalties, top_k/top_p, logprobs) · grammar (structured
output) · textstream (detokenising, stop strings) · runner (continuous batching steps) · stats
(where the step loop's time goes) · scheduler (engine thread, health) · core (Engine) · errors.
"""

from .config import BASE_NAME, EngineConfig
from .core import Engine
from .errors import Cancelled, EngineError, EngineFailure, InvalidParameter, PromptTooLong, UnknownModel
from .request import Completion, Delta, Request, SamplingParams, TokenLogprob

__all__ = [
    "BASE_NAME",
    "Cancelled",
    "Completion",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineFailure",
    "InvalidParameter",
    "PromptTooLong",
    "Request",
    "SamplingParams",
    "TokenLogprob",
    "UnknownModel",
]
