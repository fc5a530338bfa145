"""Row formats of training data: Alpaca rows, OpenAI `messages` rows and ShareGPT `conversations` rows.

A source holds one format, detected from its rows (the first row that has one of the three keys);
a row of another shape is dropped and counted like any other bad row. Good rows come out as:

    alpaca         {"instruction", "input", "output"}                        (as the seed always read them)
    messages       {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}
    conversations  the same as messages: ShareGPT's from human | gpt | system becomes user | assistant | system

A conversation must hold a user turn and end with an assistant turn (the answer that is learnt);
every turn needs non-empty text.
"""

from __future__ import annotations

FORMATS = ("alpaca", "messages", "conversations")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# Keys that mark each format, in the order a row is tested for them.
FORMAT_KEYS = {"messages": "messages", "conversations": "conversations", "alpaca": "instruction"}


def detect_format(rows: list) -> str:
    """The format of a source's rows: that of the first row with a marking key (alpaca when none has)."""
    for row in rows:
        if isinstance(row, dict):
            for fmt, key in FORMAT_KEYS.items():
                if key in row:
                    return fmt
    return "alpaca"


def check_alpaca(row: dict) -> str | None:
    """The reason an Alpaca row is unusable, or None."""
    for key in ("instruction", "output"):
        if key not in row or row[key] is None:
            return f"missing_{key}"
        if not isinstance(row[key], str):
            return f"non_text_{key}"
    if not isinstance(row.get("input") or "", str):
        return "non_text_input"
    if not row["instruction"].strip():
        return "empty_instruction"
    if not row["output"].strip():
        return "empty_output"
    return None


def _turn(turn: object, fmt: str) -> dict | str:
    """One turn as {"role", "content"}, or the reason it is unusable."""
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        return "bad_turn"
    role = turn[role_key] if fmt == "messages" else SHAREGPT_ROLES.get(turn[role_key])
    if role not in ROLES:
        return "unknown_role"
    if not isinstance(turn[text_key], str):
        return "non_text_content"
    if not turn[text_key].strip():
        return "empty_content"
    return {"role": role, "content": turn[text_key]}


def conversation(row: dict, fmt: str) -> list[dict] | str:
    """A messages/conversations row's turns as OpenAI messages, or the reason the row is unusable."""
    turns = row.get(fmt)
    if not isinstance(turns, list) or not turns:
        return f"missing_{fmt}"
    messages = []
    for turn in turns:
        message = _turn(turn, fmt)
        if isinstance(message, str):
            return message
        messages.append(message)
    if not any(m["role"] == "user" for m in messages):
        return "no_user_turn"
    if messages[-1]["role"] != "assistant":
        return "not_ending_with_assistant"
    return messages
