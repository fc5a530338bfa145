"""OpenAI request fields -> mistral_qa.sampling.SamplingParams, the one place their ranges live.

A value SamplingParams refuses becomes a 400 whose `param` is the OpenAI field the client sent
(`response_format` for `structured`, `logprobs` for the completions API's top count).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mistral_qa.sampling import SamplingParams, first_error

from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest, RequestFields, ResponseFormat

MAX_COMPLETION_LOGPROBS = 5  # the completions API's own limit on `logprobs`


def length_field(body: RequestFields) -> tuple[str, int | None]:
    """(the OpenAI name the client used, its value) for the answer length."""
    given = body.max_tokens, body.max_completion_tokens
    if None not in given and given[0] != given[1]:
        raise bad_request("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    if body.max_completion_tokens is not None:
        return "max_completion_tokens", body.max_completion_tokens
    return "max_tokens", body.max_tokens


def structured(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """`SamplingParams.structured` for a response_format, as a dict: SamplingParams validates it (the
    schema too), so a schema the grammar library cannot compile is a 400 naming response_format."""
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise bad_request("json_schema is only for type json_schema", param="response_format.json_schema")
        return None
    if fmt.type == "json_object":
        if fmt.json_schema is not None:
            raise bad_request("json_schema is only for type json_schema", param="response_format.json_schema")
        return {"type": "json_object"}
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise bad_request("type json_schema needs json_schema.schema", param="response_format.json_schema.schema")
    return {"type": "json_schema", "json_schema": fmt.json_schema.schema_}


def logprob_fields(body: RequestFields) -> dict[str, Any]:
    if isinstance(body, ChatCompletionRequest):
        fields = {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs}
        return {k: v for k, v in fields.items() if v is not None}
    assert isinstance(body, CompletionRequest)
    if body.logprobs is None:
        return {}
    if not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad_request(f"logprobs: must be between 0 and {MAX_COMPLETION_LOGPROBS}", param="logprobs")
    return {"logprobs": True, "top_logprobs": body.logprobs}


def sampling_params(body: RequestFields, default_max_tokens: int, default_temperature: float, max_context: int):
    """SamplingParams for `body`; a 400 naming the OpenAI field for any value out of range."""
    length_name, max_tokens = length_field(body)
    fields: dict[str, Any] = {
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        "temperature": default_temperature if body.temperature is None else body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop_list(),
        **logprob_fields(body),
    }
    if isinstance(body, ChatCompletionRequest):
        fields["structured"] = structured(body.response_format)
    try:
        params = SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        field, message = first_error(err)
        param = openai_name(field.split(".")[0], length_name, body)
        raise bad_request(message.replace(field, param, 1), param=param) from None
    if params.max_tokens >= max_context:
        raise bad_request(f"{length_name} must be below the context of {max_context}", param=length_name)
    return params


def openai_name(field: str, length_name: str, body: RequestFields) -> str:
    if field == "max_tokens":
        return length_name
    if field == "structured":
        return "response_format"
    if field == "top_logprobs" and isinstance(body, CompletionRequest):
        return "logprobs"
    return field
