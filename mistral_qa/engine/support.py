"""Which model families the engine runs: an explicit list of transformers `config.model_type`s,
each with a parity test against `generate` (tests/engine/test_model_families.py).

The decoder re-does the model's wiring from its modules (decoder.py), so a family that keeps
Llama's module names but changes the arithmetic (Granite scales embeddings, residuals, attention
and logits; Gemma scales embeddings and adds norms) would load and answer wrongly without an error.
Hence a list by name, not a check by shape; the shape check below only backs it up.
"""

from __future__ import annotations

from torch import nn

from ..model import ModelLoadError

# model_type -> the families it covers. q/k/v biases (Qwen2) run through each projection's own Linear.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama 2 / Llama 3",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
}
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def check_supported(model: nn.Module) -> None:
    """Raise ModelLoadError unless `model` (the bare transformers model, not a PEFT wrapper) is of a
    listed model_type and has the decoder layout the engine wires up."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"the engine does not run model_type {model_type or type(model).__name__!r}; it runs "
            f"{supported_list()} (mistral_qa.engine.support.SUPPORTED_MODEL_TYPES)"
        )
    problem = _layout_problem(model)
    if problem:
        raise ModelLoadError(f"this {model_type} model does not have the layout the engine wires up ({problem})")


def _layout_problem(model: nn.Module) -> str | None:
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no model.{embed_tokens, layers, norm, rotary_emb}"
    if not hasattr(model, "lm_head"):
        return "no lm_head"
    layer = inner.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not all(hasattr(layer, a) for a in _LAYER_PARTS):
        return f"decoder layers lack one of {_LAYER_PARTS}"
    if not all(hasattr(attn, a) for a in _ATTN_PARTS) or not all(hasattr(mlp, a) for a in _MLP_PARTS):
        return "attention or MLP is not q/k/v/o + gate/up/down"
    return None
