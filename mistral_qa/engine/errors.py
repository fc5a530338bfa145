"""Errors a caller can act on; serving maps each to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's request errors."""


class InvalidParameter(EngineError, ValueError):
    """A sampling parameter is out of range (HTTP 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class PromptTooLong(EngineError, ValueError):
    """The prompt leaves no room for an answer in the context (HTTP 400)."""

    def __init__(self, prompt_tokens: int, max_context: int):
        super().__init__(
            f"the prompt is {prompt_tokens} tokens; this model's context is {max_context} tokens, "
            "including at least one answer token"
        )
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


class UnknownModel(EngineError, LookupError):
    """No base or adapter is served under this name (HTTP 404)."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"the model {name!r} does not exist; this server has {', '.join(known)}")
        self.name = name


class Cancelled(EngineError):
    """The request was cancelled (its client went away) before it finished."""


class EngineFailure(EngineError):
    """Generation itself failed: a model error, not a bad request (HTTP 500)."""

    def __init__(self, cause: BaseException):
        super().__init__(f"generation failed: {type(cause).__name__}: {cause}")
        self.cause = cause
