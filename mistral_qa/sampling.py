"""The one sampling schema: names, bounds, defaults and descriptions of every generation setting.

The engine takes SamplingParams; the batch job's `generation:` section is SamplingSettings; the
OpenAI layer parses a request's fields by type only and builds SamplingParams from them, so a value
is in range in all three places or in none. Pure pydantic (no torch), so configs can import it
before anything heavy loads, and a bad setting fails before Ray starts.

    SamplingSettings   what changes the text: length, temperature, top_p/top_k, penalties, stop, seed,
                       structured output (JSON object / JSON schema)
    SamplingParams     + what the engine reports per token (logprobs, top_logprobs)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


class _Strict(BaseModel):
    # strict: "16" is not 16 and true is not 1; unknown keys fail.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, frozen=False)


class StructuredOutput(_Strict):
    """Constrain the answer to JSON: any JSON object, or one that matches a JSON schema."""

    type: Literal["json_object", "json_schema"] = Field(
        description="json_object: any JSON object; json_schema: `schema`."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="The JSON schema the answer must match (type json_schema only)."
    )

    @model_validator(mode="after")
    def _schema_matches_type(self) -> StructuredOutput:
        if self.type == "json_schema" and not self.json_schema:
            raise ValueError("type json_schema needs json_schema")
        if self.type == "json_object" and self.json_schema is not None:
            raise ValueError("json_schema is only for type json_schema")
        if self.json_schema is not None:
            problem = schema_problem(self.json_schema)
            if problem:
                raise ValueError(f"the JSON schema cannot be used: {problem}")
        return self


def schema_problem(schema: dict[str, Any]) -> str:
    """Why the grammar library cannot compile this JSON schema ('' if it can). Tokenizer-free, so a bad
    schema fails where settings are read (a batch config, a request body), not on every row later."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    except (ValueError, TypeError, RuntimeError) as err:
        return str(err)


class SamplingSettings(_Strict):
    max_tokens: int = Field(256, ge=1, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy (reproducible).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest head of this mass.")
    top_k: int = Field(0, ge=-1, description="Sample among the k likeliest tokens; 0 or -1: no limit.")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once it has appeared in the answer."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit per time it has appeared in the answer."
    )
    stop: list[str] = Field(
        [], max_length=MAX_STOP_STRINGS, description="Extra stop strings (at most 4), on top of the template's own."
    )
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="Sampling seed (temperature > 0); None: not seeded."
    )
    structured: StructuredOutput | None = Field(
        None, description="Constrain the answer to JSON (an object, or one matching a schema); None: free text."
    )

    # floats may come as ints (temperature: 1), as JSON and YAML write them
    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _int_is_float(cls, value: Any) -> Any:
        return float(value) if type(value) is int else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class SamplingParams(SamplingSettings):
    logprobs: bool = Field(False, description="Report each generated token's log-probability.")
    top_logprobs: int = Field(
        0, ge=0, le=MAX_TOP_LOGPROBS, description="Also report this many likeliest tokens at each position."
    )

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs")
        return value


def first_error(err) -> tuple[str, str]:
    """(field, one-line message) of a pydantic ValidationError's first error."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "sampling"
    return field, f"{field}: {first.get('msg', 'invalid value')}"
