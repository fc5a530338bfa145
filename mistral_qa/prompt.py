"""The Alpaca prompt template, used by training, serving and batch answering alike.

Changing the template touches this file only; a trained run stores the template name in its
resolved config so serving can check it answers with the template the adapter learned.
"""

from __future__ import annotations

TEMPLATE_NAME = "alpaca"

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Generation stops here too: a model that starts a new "### ..." section (Instruction, Input, or one
# it made up such as "### Explanation:") has finished its answer.
STOP_STRINGS = ("\n###",)


def build_prompt(instruction: str, input: str = "") -> str:
    """The prompt up to and including '### Response:\\n'; the answer follows it."""
    if input and input.strip():
        return _WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return _NO_INPUT.format(instruction=instruction.strip())


def build_chat_prompt(messages: list[dict]) -> str:
    """Fold OpenAI-style chat messages into one Alpaca prompt.

    The last user message is the instruction; a system message and earlier turns become the input,
    so multi-turn context reaches the model in the format it was tuned on.
    """
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    history = [f"{m['role'].capitalize()}: {m['content']}" for m in turns[:-1]]
    context = "\n".join(system + history)
    return build_prompt(turns[-1]["content"], context)
