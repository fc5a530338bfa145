"""Every failure leaves as an OpenAI error body with the status the OpenAI API would use:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mistral_qa.engine import EngineError, InvalidParameter, PromptTooLong, UnknownModel

from .protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("serve")


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_engine(err: EngineError) -> OpenAIError:
    """The HTTP form of an engine error raised while checking or running a request."""
    if isinstance(err, UnknownModel):
        return OpenAIError(404, str(err), param="model", code="model_not_found")
    if isinstance(err, PromptTooLong):
        return bad_request(str(err), param="messages", code="context_length_exceeded")
    if isinstance(err, InvalidParameter):
        return bad_request(str(err), param=err.param)
    return OpenAIError(500, str(err), type="server_error")


def validation_message(errors: list) -> tuple[str, str | None, str | None]:
    """A one-line message naming the first invalid field, that field (OpenAI's `param`), and a code."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None, None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"missing required parameter: {param}", param, None
    if first.get("type") == "extra_forbidden":
        # As OpenAI answers an unknown field: it could change the answer, so it is not ignored.
        return f"unrecognized request argument: {param}", param, "unrecognized_request_argument"
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param, None


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, type="server_error", code="engine_unhealthy")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, err: OpenAIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(err.errors())
        return bad_request(message, param=param, code=code).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return OpenAIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return OpenAIError(500, f"internal error: {type(err).__name__}", type="server_error").response()
