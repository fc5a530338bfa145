"""Which OpenAI request fields this server refuses: everything that would change the answer and is
not implemented. A refused field passes only when absent, null, or at the one value that changes
nothing (n 1, echo false, an empty logit_bias...), so clients that send defaults keep working.

The README's compatibility table (serving section) lists every field; tests/serve/test_serve_compat.py
checks each row of it against the server.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from .errors import OpenAIError

# field -> the values that change nothing (compared with their type: true is not 1)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "service_tier": ("auto", "default"),
}


def unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="unsupported_parameter")


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


def check_supported(body: BaseModel) -> None:
    """Raise a 400 (unsupported_parameter) for the first refused field set to a value that matters."""
    for name, neutral in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if not _neutral(value, neutral):
            allowed = " (only " + " or ".join(json.dumps(n) for n in neutral) + ")" if neutral else ""
            raise unsupported(name, f"{name} is not supported by this server{allowed}")
    for i, message in enumerate(getattr(body, "messages", None) or []):
        if message.name is not None:
            raise unsupported(f"messages.{i}.name", "message names are not supported by this server")
