"""The OpenAI serving logic: request bodies in, engine requests, responses or SSE chunks out.

Independent of Ray Serve and FastAPI routing (app.py holds those), so it can run in-process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import Field

from mistral_qa.config import StrictModel
from mistral_qa.engine import Completion, Engine, EngineConfig, EngineError, PromptTooLong, Request, SamplingParams
from mistral_qa.prompt import build_chat_prompt

from .errors import OpenAIError, bad_request, from_engine
from .metrics import RequestMetrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TextChoice,
    TextCompletion,
    Usage,
    new_id,
    now,
)


class ServeSettings(StrictModel):
    engine: EngineConfig = Field(description="Model, adapters and batching of each replica's engine.")
    default_max_tokens: int = Field(256, ge=1, description="Answer length when a request gives no max_tokens.")
    default_temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="When a request gives none; 0 is greedy (deterministic)."
    )
    max_pending: int = Field(
        64, ge=1, description="Requests a replica's engine holds (running + waiting); more get 429."
    )
    stream_interval_ms: float = Field(
        40,
        ge=0,
        description="Streaming: least time between two messages of one answer (tokens in between are "
        "sent together); 0 sends every token at once. Keeps the HTTP proxy up with many concurrent streams.",
    )


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(c: Completion) -> Usage:
    return Usage(
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        total_tokens=c.prompt_tokens + c.completion_tokens,
    )


def chat_prompt(body: ChatCompletionRequest) -> str:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if messages[-1]["role"] != "user":
        raise bad_request("messages: the last message must come from the user", param="messages")
    if not messages[-1]["content"].strip():
        raise bad_request("messages: the last user message is empty", param="messages")
    return build_chat_prompt(messages)


class OpenAIService:
    def __init__(self, engine: Engine, settings: ServeSettings, metrics: RequestMetrics | None = None):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.created = now()

    def models(self) -> ModelList:
        base = self.engine.base_name if self.engine.base_name in self.engine.model_names else None
        cards = [
            ModelCard(id=name, created=self.created, parent=None if name == base else base)
            for name in self.engine.model_names
        ]
        return ModelList(data=cards)

    def health(self) -> dict:
        return {"status": "ok", "models": self.engine.model_names, "pending": self.engine.pending}

    def _params(self, body: SamplingFields, max_tokens: int | None) -> SamplingParams:
        max_tokens = max_tokens or self.settings.default_max_tokens
        if max_tokens >= self.engine.max_context:
            raise bad_request(f"max_tokens must be below the context of {self.engine.max_context}", "max_tokens")
        temperature = self.settings.default_temperature if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        return SamplingParams(max_tokens, temperature, top_p, body.stop_list(), body.seed)

    def _request(self, prompt: str, params: SamplingParams, model: str, endpoint: str, prompt_param: str) -> Request:
        if self.metrics:
            self.metrics.request(model, endpoint)
        if self.engine.pending >= self.settings.max_pending:
            raise OpenAIError(
                429,
                f"this replica is busy ({self.engine.pending} requests in progress); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        try:
            return self.engine.make_request(prompt, params, model)
        except PromptTooLong as err:
            raise bad_request(str(err), param=prompt_param, code="context_length_exceeded") from None
        except EngineError as err:
            raise from_engine(err) from None

    async def _run(self, request: Request, model: str) -> Completion:
        try:
            completion = await self.engine.complete(request)
        except EngineError as err:
            raise from_engine(err) from None
        self._finished(request, model, completion)
        return completion

    def _finished(self, request: Request, model: str, completion: Completion) -> None:
        if self.metrics:
            if request.first_token_at is not None:
                self.metrics.first_token(model, request.first_token_at - request.created)
            self.metrics.finished(model, completion.completion_tokens)
            self.metrics.set_pending(self.engine.pending)

    async def chat(self, body: ChatCompletionRequest):
        params = self._params(body, body.max_completion_tokens or body.max_tokens)
        request = self._request(chat_prompt(body), params, body.model, "chat", "messages")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(self._chat_chunks(request, body.model, include_usage))
        c = await self._run(request, body.model)
        choice = ChatChoice(message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
        return ChatCompletion(id=new_id("chatcmpl"), created=now(), model=body.model, choices=[choice], usage=usage(c))

    async def completions(self, body: CompletionRequest):
        try:
            prompt = body.prompt_text()
        except ValueError as err:
            raise bad_request(str(err), param="prompt") from None
        params = self._params(body, body.max_tokens)
        request = self._request(prompt, params, body.model, "completions", "prompt")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(self._text_chunks(request, body.model, include_usage))
        c = await self._run(request, body.model)
        choice = TextChoice(text=c.text, finish_reason=c.finish_reason)
        return TextCompletion(id=new_id("cmpl"), created=now(), model=body.model, choices=[choice], usage=usage(c))

    async def _deltas(self, request: Request, model: str) -> AsyncIterator[tuple[str, Completion | None]]:
        async for delta in self.engine.stream(request, self.settings.stream_interval_ms / 1000):
            if delta.completion is not None:
                self._finished(request, model, delta.completion)
            yield delta.text, delta.completion

    async def _chat_chunks(self, request: Request, model: str, include_usage: bool) -> AsyncIterator[str]:
        rid, created = new_id("chatcmpl"), now()

        def chunk(delta: ChunkDelta, finish: str | None = None, usage_: Usage | None = None, choices=True) -> str:
            items = [ChatChunkChoice(delta=delta, finish_reason=finish)] if choices else []
            body = ChatCompletionChunk(id=rid, created=created, model=model, choices=items, usage=usage_)
            return sse(chunk_payload(body, include_usage))

        yield chunk(ChunkDelta(role="assistant", content=""))
        async for text, completion in self._deltas(request, model):
            if text:
                yield chunk(ChunkDelta(content=text))
            if completion is not None:
                yield chunk(ChunkDelta(), completion.finish_reason)
                if include_usage:
                    yield chunk(ChunkDelta(), usage_=usage(completion), choices=False)

    async def _text_chunks(self, request: Request, model: str, include_usage: bool) -> AsyncIterator[str]:
        rid, created = new_id("cmpl"), now()

        def chunk(text: str, finish: str | None = None, usage_: Usage | None = None, choices=True) -> str:
            items = [TextChoice(text=text, finish_reason=finish)] if choices else []
            body = TextCompletion(id=rid, created=created, model=model, choices=items, usage=usage_)
            return sse(chunk_payload(body, include_usage))

        async for text, completion in self._deltas(request, model):
            if completion is None:
                yield chunk(text)
                continue
            yield chunk(text, completion.finish_reason)
            if include_usage:
                yield chunk("", usage_=usage(completion), choices=False)


def chunk_payload(body: ChatCompletionChunk | TextCompletion, include_usage: bool) -> dict:
    """As OpenAI streams it: deltas carry only what they set; usage appears only when asked for."""
    payload = body.model_dump()
    for choice in payload["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if not include_usage:
        payload.pop("usage")
    return payload


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events: the chunks, an error event if generation fails midway, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            async for item in chunks:
                yield item
        except EngineError as err:
            yield sse(from_engine(err).body.model_dump())
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
