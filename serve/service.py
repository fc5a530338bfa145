"""The OpenAI serving logic: request bodies in, engine requests, responses or SSE chunks out.

Independent of Ray Serve and FastAPI routing (app.py holds those), so it can run in-process.
Order of checks for a generation request, cheapest first, all before the engine sees it:
refused fields (compat.py) -> sampling ranges (params.py) -> the prompt's shape and its length in
characters -> admission (max_pending, counted at once) -> tokenising (on a worker thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import weakref
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from pydantic import Field

from mistral_qa.adapters import adapter_templates
from mistral_qa.config import StrictModel
from mistral_qa.engine import (
    Completion,
    Delta,
    Engine,
    EngineConfig,
    EngineError,
    EngineFailure,
    PromptTooLong,
    Request,
    SamplingParams,
)
from mistral_qa.templates import DEFAULT_TEMPLATE, PromptTemplate, load_template

from .compat import check_supported
from .errors import OpenAIError, bad_request, from_engine, unavailable
from .logprobs import TextOffsets, chat_logprobs, text_logprobs
from .metrics import RequestMetrics
from .params import sampling_params
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
    RequestFields,
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
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, in bytes; larger ones get 413 without being read further.",
    )


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(c: Completion) -> Usage:
    return Usage(
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        total_tokens=c.prompt_tokens + c.completion_tokens,
    )


def chat_prompt(body: ChatCompletionRequest, template: PromptTemplate) -> str:
    """The request's conversation in the template of the model it asks for: chat maps every turn onto
    the tokenizer's template; alpaca folds the system message and earlier turns into its ### Input."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if messages[-1]["role"] != "user":
        raise bad_request("messages: the last message must come from the user", param="messages")
    if not messages[-1]["content"].strip():
        raise bad_request("messages: the last user message is empty", param="messages")
    try:
        return template.prompt(messages)
    except ValueError as err:  # e.g. a chat template that needs alternating user/assistant turns
        raise bad_request(f"messages: {err}", param="messages") from None


def serving_templates(engine: Engine) -> dict[str, PromptTemplate]:
    """The template each served model answers chat requests with: an adapter's is the one it learned
    (its training_config.yaml; one this tokenizer cannot render fails the replica at start), the
    base model's is alpaca, as it always was."""
    templates = adapter_templates(engine.cfg.adapters, engine.tokenizer)
    return {engine.base_name: load_template(DEFAULT_TEMPLATE, engine.tokenizer), **templates}


def completion_prompt(body: CompletionRequest) -> str:
    try:
        prompt = body.prompt_text()
    except ValueError as err:
        raise bad_request(str(err), param="prompt") from None
    if not prompt:
        # Some tokenizers add no BOS: "" would be 0 tokens, with nothing to continue from.
        raise bad_request("prompt: the prompt is empty", param="prompt")
    return prompt


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers: its vocabulary spelling ("▁the", "Ġthe",
    "<0xE2>") is never shorter than the text it stands for."""
    return max(len(token) for token in tokenizer.get_vocab())


class Admission:
    """One request counted against max_pending from the moment it is accepted until it ends."""

    def __init__(self, on_release: Callable[[], None]):
        self._on_release = on_release
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release()


class OpenAIService:
    def __init__(self, engine: Engine, settings: ServeSettings, metrics: RequestMetrics | None = None):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.created = now()
        self.in_flight = 0  # admitted and not finished: tokenising, waiting or generating
        # Prompts longer than this many characters cannot fit the context: refused without tokenising.
        self.max_prompt_chars = engine.max_context * longest_token_chars(engine.tokenizer)
        self.templates = serving_templates(engine)
        # One thread: callers' tokenising stays off the event loop, and the tokenizer (not safe to
        # share between threads) is used by one thread at a time.
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def models(self) -> ModelList:
        base = self.engine.base_name if self.engine.base_name in self.engine.model_names else None
        cards = [
            ModelCard(id=name, created=self.created, parent=None if name == base else base)
            for name in self.engine.model_names
        ]
        return ModelList(data=cards)

    def check_health(self) -> None:
        """A 503 when the engine cannot answer (its thread died or hangs)."""
        try:
            self.engine.check_health()
        except EngineFailure as err:
            raise unavailable(f"this replica's engine is unhealthy: {err}") from None

    def health(self) -> dict:
        self.check_health()
        return {"status": "ok", "models": self.engine.model_names, "pending": self.in_flight}

    def _admit(self, model: str, endpoint: str) -> Admission:
        """Count the request at once (no await before this), so at most max_pending are ever accepted."""
        if self.metrics:
            self.metrics.request(model, endpoint)
        if self.in_flight >= self.settings.max_pending:
            raise OpenAIError(
                429,
                f"this replica is busy ({self.in_flight} requests in progress); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self._set_pending()
        return Admission(self._released)

    def _released(self) -> None:
        self.in_flight -= 1
        self._set_pending()

    def _set_pending(self) -> None:
        if self.metrics:
            self.metrics.set_pending(self.in_flight)

    def _params(self, body: RequestFields) -> SamplingParams:
        check_supported(body)
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only for stream: true", param="stream_options")
        s = self.settings
        return sampling_params(body, s.default_max_tokens, s.default_temperature, self.engine.max_context)

    async def _request(self, prompt: str, params: SamplingParams, model: str, prompt_param: str) -> Request:
        if len(prompt) > self.max_prompt_chars:
            raise bad_request(
                f"the prompt is {len(prompt)} characters; no prompt over {self.max_prompt_chars} fits this "
                f"model's context of {self.engine.max_context} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        try:
            stop = self._template(model).stop  # e.g. Alpaca's "\n###": the engine knows no template
            return await loop.run_in_executor(self._tokenize, self.engine.make_request, prompt, params, model, stop)
        except PromptTooLong as err:
            raise bad_request(str(err), param=prompt_param, code="context_length_exceeded") from None
        except EngineError as err:
            raise from_engine(err) from None

    def _template(self, model: str) -> PromptTemplate:
        """The template `model` learned; an unknown model gets the base's here and its 404 from the engine next."""
        return self.templates.get(model, self.templates[self.engine.base_name])

    def _finished(self, request: Request, model: str, completion: Completion) -> None:
        if self.metrics:
            if request.first_token_at is not None:
                self.metrics.first_token(model, request.first_token_at - request.created)
            self.metrics.finished(model, completion.completion_tokens)

    async def chat(self, body: ChatCompletionRequest):
        params = self._params(body)
        prompt = chat_prompt(body, self._template(body.model))
        return await self._answer(body, prompt, params, "chat", "messages", self._chat_chunks, self._chat_reply)

    async def completions(self, body: CompletionRequest):
        params = self._params(body)
        prompt = completion_prompt(body)
        return await self._answer(body, prompt, params, "completions", "prompt", self._text_chunks, self._text_reply)

    async def _answer(self, body: RequestFields, prompt, params, endpoint, prompt_param, chunks, reply):
        admission = self._admit(body.model, endpoint)
        try:
            request = await self._request(prompt, params, body.model, prompt_param)
            deltas = self._deltas(request, body.model)
            try:
                # Wait for the engine's first piece before answering: an error it can still raise
                # (a request it refuses on admission) is then an HTTP status, never a 200 + error event.
                first = await anext(deltas)
            except EngineError as err:
                raise from_engine(err) from None
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return event_stream(chunks(first, deltas, body.model, include_usage), admission)
            return reply(await self._last(first, deltas), body.model)
        except BaseException:
            admission.release()
            raise
        finally:
            if not body.stream:
                admission.release()

    async def _deltas(self, request: Request, model: str) -> AsyncIterator[Delta]:
        async for delta in self.engine.stream(request, self.settings.stream_interval_ms / 1000):
            if delta.completion is not None:
                self._finished(request, model, delta.completion)
            yield delta

    async def _last(self, first: Delta, deltas: AsyncIterator[Delta]) -> Completion:
        if first.completion is not None:
            return first.completion
        try:
            async for delta in deltas:
                if delta.completion is not None:
                    return delta.completion
        except EngineError as err:
            raise from_engine(err) from None
        raise OpenAIError(500, "the engine ended a request without a result", type="server_error")

    @staticmethod
    def _chat_reply(c: Completion, model: str) -> ChatCompletion:
        message = AssistantMessage(content=c.text)
        choice = ChatChoice(message=message, finish_reason=c.finish_reason, logprobs=chat_logprobs(c.logprobs))
        return ChatCompletion(id=new_id("chatcmpl"), created=now(), model=model, choices=[choice], usage=usage(c))

    @staticmethod
    def _text_reply(c: Completion, model: str) -> TextCompletion:
        choice = TextChoice(
            text=c.text, finish_reason=c.finish_reason, logprobs=text_logprobs(c.logprobs, TextOffsets())
        )
        return TextCompletion(id=new_id("cmpl"), created=now(), model=model, choices=[choice], usage=usage(c))

    async def _chat_chunks(self, first: Delta, deltas, model: str, include_usage: bool) -> AsyncIterator[str]:
        rid, created = new_id("chatcmpl"), now()

        def chunk(delta: ChunkDelta, finish=None, usage_=None, logprobs=None, choices=True) -> str:
            items = [ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if choices else []
            body = ChatCompletionChunk(id=rid, created=created, model=model, choices=items, usage=usage_)
            return sse(chunk_payload(body, include_usage))

        yield chunk(ChunkDelta(role="assistant", content=""))
        async for delta in _chain(first, deltas):
            if delta.text or delta.logprobs:
                yield chunk(ChunkDelta(content=delta.text), logprobs=chat_logprobs(delta.logprobs))
            if delta.completion is not None:
                yield chunk(ChunkDelta(), delta.completion.finish_reason)
                if include_usage:
                    yield chunk(ChunkDelta(), usage_=usage(delta.completion), choices=False)

    async def _text_chunks(self, first: Delta, deltas, model: str, include_usage: bool) -> AsyncIterator[str]:
        rid, created = new_id("cmpl"), now()
        offsets = TextOffsets()

        def chunk(text: str, finish=None, usage_=None, logprobs=None, choices=True) -> str:
            items = [TextChoice(text=text, finish_reason=finish, logprobs=logprobs)] if choices else []
            body = TextCompletion(id=rid, created=created, model=model, choices=items, usage=usage_)
            return sse(chunk_payload(body, include_usage))

        async for delta in _chain(first, deltas):
            finish = None if delta.completion is None else delta.completion.finish_reason
            yield chunk(delta.text, finish, logprobs=text_logprobs(delta.logprobs, offsets))
            if delta.completion is not None and include_usage:
                yield chunk("", usage_=usage(delta.completion), choices=False)


async def _chain(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    yield first
    if first.completion is None:
        async for delta in rest:
            yield delta


def chunk_payload(body: ChatCompletionChunk | TextCompletion, include_usage: bool) -> dict:
    """As OpenAI streams it: deltas carry only what they set; usage appears only when asked for."""
    payload = body.model_dump()
    for choice in payload["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if not include_usage:
        payload.pop("usage")
    return payload


def event_stream(chunks: AsyncIterator[str], admission: Admission) -> StreamingResponse:
    """Server-sent events: the chunks, an error event if generation fails midway, then [DONE].
    The admission ends with the stream, or when the stream is dropped unstarted (client gone)."""

    async def events() -> AsyncIterator[str]:
        try:
            async for item in chunks:
                yield item
        except EngineError as err:
            yield sse(from_engine(err).body.model_dump())
        finally:
            admission.release()
        yield sse("[DONE]")

    generator = events()
    weakref.finalize(generator, admission.release)
    return StreamingResponse(generator, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
