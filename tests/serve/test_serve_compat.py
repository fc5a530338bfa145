"""The README's request-field table (serving section) against the session's Serve app, row by row:
a supported field answers 200, a field without effect answers 200, a refused one answers 400
naming itself with `code: unsupported_parameter`; the table covers every field the request models
declare, and a field it does not list is refused as unrecognized."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests

from serve.protocol import ChatCompletionRequest, CompletionRequest

README = Path(__file__).resolve().parents[2] / "README.md"
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
BASE = {
    "chat": {"model": "tiny", "messages": [{"role": "user", "content": "Is a phone in bed bad for sleep?"}]},
    "completions": {"model": "tiny", "prompt": "Screens at night"},
}
# Fields that need a partner to mean anything.
PARTNERS = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True}}


def table_rows() -> list[tuple[str, str, str, object]]:
    """(field, endpoint, support, example) for every row of the table under '#### Request fields'."""
    text = README.read_text()
    section = text[text.index("#### Request fields") : text.index("### Errors")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        fields, endpoints, support, example = cells
        for field in re.findall(r"`([^`]+)`", fields):
            for endpoint in ("chat", "completions") if endpoints == "both" else (endpoints,):
                rows.append((field, endpoint, support.split(":")[0].split()[0], json.loads(example.strip("`"))))
    return rows


ROWS = table_rows()


def test_the_table_covers_every_declared_field():
    for endpoint, model in (("chat", ChatCompletionRequest), ("completions", CompletionRequest)):
        declared = {name for name in model.model_fields} - set(BASE[endpoint])
        listed = {field for field, e, _, _ in ROWS if e == endpoint and "[]" not in field}
        assert declared == listed, endpoint
    assert {support for _, _, support, _ in ROWS} == {"supported", "no", "refused"}


def request_body(field: str, endpoint: str, example: object) -> dict:
    body = {**BASE[endpoint], "max_tokens": 4}
    if field in ("max_tokens", "max_completion_tokens"):
        del body["max_tokens"]
    if field == "messages[].name":
        body["messages"] = [{**body["messages"][0], "name": example}]
        return body
    return {**body, **PARTNERS.get(field, {}), field: example}


@pytest.mark.parametrize("field, endpoint, support, example", ROWS, ids=[f"{r[1]}-{r[0]}" for r in ROWS])
def test_table_row(serve_url, field, endpoint, support, example):
    response = requests.post(serve_url + PATHS[endpoint], json=request_body(field, endpoint, example), timeout=120)
    if support == "refused":
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "unsupported_parameter" and error["param"] == field.replace("[]", ".0"), error
    else:
        assert response.status_code == 200, response.text


def test_an_unknown_field_is_refused(serve_url):
    for endpoint in PATHS:
        body = {**BASE[endpoint], "repetition_penalty": 1.2}
        response = requests.post(serve_url + PATHS[endpoint], json=body, timeout=60)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "unrecognized_request_argument" and error["param"] == "repetition_penalty"


def test_neutral_values_of_refused_fields_pass(serve_url):
    chat = {**BASE["chat"], "max_tokens": 2, "n": 1, "logit_bias": {}, "tools": [], "tool_choice": "none"}
    text = {**BASE["completions"], "max_tokens": 2, "n": 1, "best_of": 1, "echo": False, "suffix": ""}
    for endpoint, body in (("chat", chat), ("completions", text)):
        assert requests.post(serve_url + PATHS[endpoint], json=body, timeout=60).status_code == 200
    # true is not 1: a refused field's neutral value is matched with its type
    response = requests.post(serve_url + PATHS["completions"], json={**text, "best_of": True}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "best_of"


def test_logprobs_shapes(serve_url):
    """OpenAI's two shapes, plain and streamed (needs the engine's logprobs)."""
    chat = {**BASE["chat"], "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    reply = requests.post(serve_url + PATHS["chat"], json=chat, timeout=60).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    for token in content:
        assert set(token) == {"token", "logprob", "bytes", "top_logprobs"} and token["logprob"] <= 0
        assert len(token["top_logprobs"]) == 2 and token["bytes"] == list(token["token"].encode())
    text = {**BASE["completions"], "max_tokens": 4, "logprobs": 3}
    reply = requests.post(serve_url + PATHS["completions"], json=text, timeout=60).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == 4
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"])
    with requests.post(serve_url + PATHS["completions"], json={**text, "stream": True}, stream=True, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line and "[DONE]" not in line]
    streamed = [
        t for e in events if e["choices"] and e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]
    ]
    assert streamed == logprobs["tokens"]
