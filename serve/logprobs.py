"""The engine's per-token log-probabilities in OpenAI's two response shapes.

    chat:        choices[].logprobs.content[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]
    completions: choices[].logprobs{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}

Streams send each delta's tokens; text_offset continues from the previous delta's (TextOffsets).
"""

from __future__ import annotations

from mistral_qa.engine import TokenLogprob

from .protocol import ChatLogprobs, ChatTokenLogprob, TextLogprobs, TopLogprob


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(tokens: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if tokens is None:
        return None
    content = [
        ChatTokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=_utf8(t.token),
            top_logprobs=[TopLogprob(token=text, logprob=lp, bytes=_utf8(text)) for _, text, lp in t.top],
        )
        for t in tokens
    ]
    return ChatLogprobs(content=content)


class TextOffsets:
    """Character offsets of tokens in the answer, carried across the deltas of one stream."""

    def __init__(self):
        self.position = 0

    def take(self, tokens: list[TokenLogprob]) -> list[int]:
        offsets = []
        for t in tokens:
            offsets.append(self.position)
            self.position += len(t.token)
        return offsets


def text_logprobs(tokens: list[TokenLogprob] | None, offsets: TextOffsets) -> TextLogprobs | None:
    if tokens is None:
        return None
    return TextLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        # OpenAI's shape is a dict, so two alternatives with the same text keep the likelier one.
        top_logprobs=[{text: lp for _, text, lp in reversed(t.top)} for t in tokens],
        text_offset=offsets.take(tokens),
    )
