"""Prompt templates: how a conversation becomes the text the model reads, in training and in answering.

Two templates, chosen by `data.template` when training and recorded in the adapter's
training_config.yaml, so serving and the batch job answer in the format the adapter learned:

    alpaca  the seed's "### Instruction / ### Input / ### Response" text (prompt.py). A conversation
            becomes one instruction: the last user turn is the instruction, the system message and
            earlier turns the input (so earlier assistant turns carry no loss in training).
    chat    the tokenizer's own chat template (SmolLM2-Instruct, Mistral-Instruct and Llama chat models
            carry one); every assistant turn carries the loss, ending with its end-of-turn token.

Both take a conversation as OpenAI-style messages: [{"role": "system" | "user" | "assistant", "content"}].
"""

from __future__ import annotations

from typing import Protocol

from .prompt import STOP_STRINGS, build_chat_prompt

TEMPLATES = ("alpaca", "chat")
DEFAULT_TEMPLATE = "alpaca"


class TemplateError(ValueError):
    """A template cannot be used (unknown name, or `chat` with a tokenizer that has no chat template)."""


class PromptTemplate(Protocol):
    name: str
    stop: tuple[str, ...]  # stop strings of the template, beyond the tokenizer's end-of-sequence ids

    def prompt(self, messages: list[dict]) -> str:
        """The text that asks for the next assistant turn; the conversation must end with a user turn."""

    def instruction_messages(self, instruction: str, input: str = "") -> list[dict]:
        """An instruction with optional context (an Alpaca row, the batch job's question + context) as
        the conversation that asks it."""

    def training_example(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation (ending with an assistant turn) and, per token, whether
        it belongs to an assistant answer the model should learn to write."""


def instruction_prompt(template: PromptTemplate, instruction: str, input: str = "") -> str:
    """The prompt for one instruction with optional context (the batch job's question + context)."""
    return template.prompt(template.instruction_messages(instruction, input))


def _check_ends_with_answer(messages: list[dict]) -> None:
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")


class AlpacaTemplate:
    """The seed's Alpaca template; tokenised exactly as the reference run always has."""

    name = "alpaca"
    stop = STOP_STRINGS

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def prompt(self, messages: list[dict]) -> str:
        return build_chat_prompt(messages)

    def instruction_messages(self, instruction: str, input: str = "") -> list[dict]:
        # The context goes where build_chat_prompt reads the ### Input section from: build_prompt's text.
        context = [{"role": "system", "content": input}] if input and input.strip() else []
        return [*context, {"role": "user", "content": instruction}]

    def training_example(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        _check_ends_with_answer(messages)
        prompt = build_chat_prompt(messages[:-1])
        tok = self.tokenizer
        prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        ids = tok(prompt + messages[-1]["content"].strip(), add_special_tokens=True)["input_ids"]
        ids = ids + [tok.eos_token_id]
        # At least the EOS is learnt, even if the answer's first token merged into the prompt's last.
        n_prompt = min(len(prompt_ids), len(ids) - 1)
        return ids, [False] * n_prompt + [True] * (len(ids) - n_prompt)


class ChatTemplate:
    """The tokenizer's own chat template (jinja, rendered by transformers' apply_chat_template).

    Rendered text is tokenised with add_special_tokens=True, as the engine tokenises prompts; a
    template that writes the BOS itself (Mistral-Instruct, Llama) has it removed from the text when the
    tokenizer adds one anyway, so the model never sees two.
    """

    name = "chat"
    stop: tuple[str, ...] = ()  # the end-of-turn token is the tokenizer's EOS (SmolLM2: <|im_end|>)

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"data.template=chat needs a tokenizer with a chat template, and {type(tokenizer).__name__} "
                f"({getattr(tokenizer, 'name_or_path', '?')}) has none; use data.template=alpaca or an "
                "instruction-tuned model whose tokenizer carries one (e.g. SmolLM2-135M-Instruct)"
            )
        if not tokenizer.is_fast:
            raise TemplateError("data.template=chat needs a fast tokenizer (it masks the loss by character offsets)")
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token
        self._strip_bos = bos if bos and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else None

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError as JinjaError

        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except JinjaError as err:  # the template's own checks, e.g. "roles must alternate user/assistant"
            raise ValueError(f"the chat template refuses this conversation: {err}") from None
        if self._strip_bos and text.startswith(self._strip_bos):
            text = text[len(self._strip_bos) :]
        return text

    def prompt(self, messages: list[dict]) -> str:
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the last message must come from the user")
        return self._render(messages, add_generation_prompt=True)

    def instruction_messages(self, instruction: str, input: str = "") -> list[dict]:
        # Context in the user turn, not a system message: it belongs to this question, and a system
        # message would replace the model's own (SmolLM2's template writes one only when none is given).
        text = instruction.strip()
        if input and input.strip():
            text = f"{text}\n\n{input.strip()}"
        return [{"role": "user", "content": text}]

    def answer_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant answer in it: the
        content (stripped) and the end-of-turn text right after it, if the template writes one there.

        Each span is found by rendering the conversation up to that turn with the generation prompt
        (where the answer starts) and with the turn (where it ends); a template that rewrites earlier
        turns as the conversation grows cannot be masked this way and is refused.
        """
        _check_ends_with_answer(messages)
        messages = [{**m, "content": m["content"].strip()} for m in messages]
        full = self._render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise TemplateError("this chat template renders earlier turns differently as the conversation grows")
            content = message["content"]
            start = through.find(content, len(before))
            if start < 0:
                raise TemplateError(f"the chat template does not write assistant turn {i}'s text as given")
            spans.append((start, start + len(content) + len(self._end_of_turn(through[start + len(content) :]))))
        return full, spans

    def _end_of_turn(self, tail: str) -> str:
        """The special token (e.g. <|im_end|>, </s>) that closes an answer, if the tail starts with one."""
        for token in self.tokenizer.all_special_tokens:
            if token and tail.startswith(token):
                return token
        return ""

    def training_example(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        text, spans = self.answer_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        # A token belongs to an answer when it overlaps one (a "▁word" token may start at the space
        # before it; added special tokens such as BOS have the empty offset (0, 0)).
        mask = [any(start < hi and end > lo for lo, hi in spans) for start, end in enc["offset_mapping"]]
        return enc["input_ids"], mask


def load_template(name: str, tokenizer) -> PromptTemplate:
    """The template called `name` over `tokenizer`; TemplateError names the problem."""
    if name == "alpaca":
        return AlpacaTemplate(tokenizer)
    if name == "chat":
        return ChatTemplate(tokenizer)
    raise TemplateError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
