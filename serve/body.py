"""Reading a POST body safely: JSON only, bounded in size, and parsed into plain Python values that
cannot fail later for being too deep or holding text that is not Unicode.

Each refusal is an OpenAIError (415, 413 or 400) raised before anything reaches the engine:
- Content-Type must be application/json (a charset is allowed). Browsers send text/plain and form
  types cross-site without a preflight; requiring JSON keeps any web page from posting here.
- The size limit is checked on Content-Length first, then again while reading, so a chunked body
  with no Content-Length is never read past the limit.
- NaN/Infinity literals, nesting deeper than MAX_DEPTH and lone surrogates ("\\ud800", which Python's
  json accepts but nothing downstream can encode) are 400s naming the top-level field that holds them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .errors import OpenAIError, bad_request

MAX_DEPTH = 64  # far above any real request (a JSON schema a few levels deep), far below the recursion limit
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise OpenAIError(
            415,
            f"the request body must be JSON sent as Content-Type: application/json (got {media_type or 'none'})",
            code="unsupported_media_type",
        )


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing it (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise bad_request("the Content-Length header is not a number")
        if int(declared) > limit:
            raise too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object whose values are at most MAX_DEPTH deep and whose strings are valid Unicode."""
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise bad_request(f"nested deeper than {MAX_DEPTH} levels", param=_deep_key(raw)) from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    for key, value in data.items():
        _check_value(key, value)
    return data


def _check_value(key: str, value: Any) -> None:
    """Walk one top-level value without recursion (it may be arbitrarily deep)."""
    stack = [(key, 0), (value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"{key}: nested deeper than {MAX_DEPTH} levels", param=key)
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{key}: a string holds a lone surrogate (e.g. \\ud800)", param=key) from None
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _deep_key(raw: bytes) -> str | None:
    """The top-level key whose value nests deeper than MAX_DEPTH (only on the failure path: a Python loop)."""
    depth, key, last_string = 0, None, None
    for token in _TOKEN.finditer(raw):
        text = token.group()
        if text in (b"{", b"["):
            depth += 1
            if depth > MAX_DEPTH:
                return key
        elif text in (b"}", b"]"):
            depth -= 1
        elif text == b":" and depth == 1:
            key = last_string
        else:
            last_string = text[1:-1].decode("utf-8", "replace")
    return key
