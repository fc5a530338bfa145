"""What a hostile or careless client can send to the session's Serve app (real Ray Serve, real HTTP,
the tiny model): bodies too big, not JSON, too deep, not Unicode, prompts too long to tokenise, and
values that used to reach the engine and come back as 500s. Each is refused with an OpenAI error
body and the right status, and the app keeps answering."""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse

import pytest
import requests

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DEFAULT_LIMIT = 4 * 1024 * 1024  # ServeSettings.max_body_bytes


def chat_body(content: str = "Does phone use before bed hurt sleep?", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def post_raw(url: str, path: str, body: bytes, content_type: str | None) -> requests.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return requests.post(url + path, data=body, headers=headers, timeout=120)


def assert_error(response: requests.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_empty_completions_prompt_is_refused(serve_url):
    # The tiny Mistral's tokenizer adds BOS, so "" used to be answered as a continuation of BOS alone;
    # with a tokenizer that adds none it reached the engine as a 0-token prompt.
    for prompt in ("", [""]):
        response = requests.post(serve_url + COMPLETIONS, json={"model": "tiny", "prompt": prompt}, timeout=60)
        assert_error(response, 400, "prompt")


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_post_needs_a_json_content_type(serve_url, content_type):
    """Browsers send these cross-site without asking first; JSON needs a preflight, which we never grant."""
    response = post_raw(serve_url, CHAT, json.dumps(chat_body()).encode(), content_type)
    assert_error(response, 415, None, "unsupported_media_type")


def test_json_with_a_charset_is_fine(serve_url):
    response = post_raw(serve_url, CHAT, json.dumps(chat_body()).encode(), "application/json; charset=utf-8")
    assert response.status_code == 200, response.text


def http_exchange(url: str, head: str, send_body) -> tuple[int, bytes, int]:
    """Send `head`, then whatever `send_body(sock)` sends, on one raw connection, while reading the
    answer; (status, response bytes, body bytes sent). The sender stops once an answer arrives."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=120)
    answered = threading.Event()
    sent = [0]

    def sender():
        try:
            sock.sendall(head.encode())
            sent[0] = send_body(sock, answered)
        except OSError:  # the server closed the connection after answering
            pass

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    response = b""
    while b"\r\n\r\n" not in response or not response.endswith(b"}"):
        piece = sock.recv(65536)
        if not piece:
            break
        response += piece
        answered.set()
    answered.set()
    thread.join(timeout=60)
    sock.close()
    return int(response.split(b" ", 2)[1]), response, sent[0]


def test_declared_oversize_body_is_refused_before_it_is_sent(serve_url):
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {DEFAULT_LIMIT + 1}\r\n\r\n"
    )

    def send_nothing(sock, answered):
        answered.wait(60)  # the server must answer on the header alone
        return 0

    status, response, _ = http_exchange(serve_url, head, send_nothing)
    assert status == 413, response
    assert b'"request_too_large"' in response


def test_chunked_body_is_not_read_past_the_limit(serve_url):
    """No Content-Length: the replica counts while it reads and answers 413 while the client is
    still sending; before, it read the whole body (here up to 256 MB) first."""
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    cap = 256 * 1024 * 1024

    def send_forever(sock, answered):
        chunk = b"a" * 65536
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        start = b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        sock.sendall(f"{len(start):x}\r\n".encode() + start + b"\r\n")
        sent = len(start)
        while sent < cap and not answered.is_set():
            sock.sendall(frame)
            sent += len(chunk)
        if sent >= cap:
            sock.sendall(b'4\r\n"}]}\r\n0\r\n\r\n')
        return sent

    status, response, sent = http_exchange(serve_url, head, send_forever)
    assert status == 413, response[:300]
    assert sent < cap


def test_huge_prompt_is_refused_by_its_length_without_tokenising(serve_url):
    # 3 MB: under the body limit, ~1,500 x the characters any 2,048-token prompt can have.
    response = requests.post(serve_url + CHAT, json=chat_body("sleep " * 500_000), timeout=120)
    error = assert_error(response, 400, "messages", "context_length_exceeded")
    assert "characters" in error["message"]
    assert requests.get(serve_url + "/health", timeout=30).status_code == 200


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


RAW_CASES = [
    # nesting too deep for Python's json (RecursionError, was a 500) and merely too deep
    ('{"model": "tiny", "metadata": ' + nested(100_000) + "}", "metadata"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ' + nested(200) + "}", "stop"),
    # a lone surrogate: valid JSON escape, not encodable text (was a 500 from the tokenizer)
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + str(2**64) + "}", "seed"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + str(-(2**63) - 1) + "}", "seed"),
]


@pytest.mark.parametrize(
    "raw, param", RAW_CASES, ids=["recursion", "deep", "surrogate", "nan", "seed-high", "seed-low"]
)
def test_client_errors_that_were_500s(serve_url, raw, param):
    response = post_raw(serve_url, CHAT, raw.encode(), "application/json")
    assert_error(response, 400, param)


@pytest.mark.parametrize(
    "body, param",
    [
        (chat_body(max_tokens=True), "max_tokens"),
        (chat_body(max_tokens="16"), "max_tokens"),
        (chat_body(stream="yes"), "stream"),
        (chat_body(temperature="0.5"), "temperature"),
        (chat_body(stream_options={"include_usage": True}), "stream_options"),
    ],
)
def test_types_are_strict(serve_url, body, param):
    assert_error(requests.post(serve_url + CHAT, json=body, timeout=60), 400, param)


# A schema the grammar library cannot compile ("strin" is no JSON type): known before any token.
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "strin"}}}


def test_stream_errors_known_before_the_first_byte_are_http_errors(serve_url):
    for body, status, param in [
        (chat_body(model="no-such-model", stream=True), 404, "model"),
        (chat_body(stream=True, seed=2**64), 400, "seed"),
        (chat_body("sleep " * 3000, stream=True), 400, "messages"),
        (chat_body(stream=True, response_format=BAD_SCHEMA), 400, "response_format"),
        (chat_body(response_format=BAD_SCHEMA), 400, "response_format"),
    ]:
        response = requests.post(serve_url + CHAT, json=body, timeout=60)
        assert response.headers["content-type"].startswith("application/json")
        assert_error(response, status, param)


def test_app_still_answers(serve_url):
    assert requests.post(serve_url + CHAT, json=chat_body(), timeout=60).status_code == 200
