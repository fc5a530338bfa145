"""The OpenAI-compatible app on real Ray Serve, over real HTTP, with the tiny model and the tiny
adapter made by the training job: the official `openai` client, concurrency, every error case,
API keys, back-pressure, metrics and a killed replica."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests
from openai import OpenAI

CHAT = "/v1/chat/completions"
QUESTION = "Does phone use before bed hurt sleep?"


def chat_body(content: str = QUESTION, model: str = "tiny", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture(scope="module")
def client(serve_url) -> OpenAI:
    return OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


class Http(requests.Session):
    """requests with a base URL and a timeout on every call."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", 120)
        return super().request(method, url if "://" in url else self.base_url + url, **kwargs)


@pytest.fixture(scope="module")
def http(serve_url):
    with Http(serve_url) as session:
        yield session


def test_models_lists_base_and_adapter(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"base", "tiny"}
    assert models["tiny"].parent == "base"


def test_health(http):
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["models"] == ["base", "tiny"]


def test_chat_plain_and_streamed_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 20
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_plain_and_streamed_agree(client):
    plain = client.completions.create(model="base", prompt="Screens at night", max_tokens=10)
    assert plain.choices[0].text and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 10
    streamed = list(client.completions.create(model="base", prompt="Screens at night", max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_repeats(client):
    def ask():
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, seed=3
        )

    assert ask().choices[0].message.content == ask().choices[0].message.content


def test_sse_wire_format(http):
    with http.post(CHAT, json=chat_body(max_tokens=4, stream=True), stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_32_concurrent_greedy_requests_equal_each_alone(http):
    bodies = [chat_body(f"Question {i}: how long should a {i}-year-old use a phone?", max_tokens=16) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: http.post(CHAT, json=b), bodies))
    assert [r.status_code for r in together] == [200] * 32
    for body, response in zip(bodies, together, strict=True):
        alone = http.post(CHAT, json=body)
        assert alone.json()["choices"] == response.json()["choices"]


ERROR_CASES = [
    (CHAT, b"{not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    (CHAT, chat_body() | {"messages": []}, 400, "messages"),
    (CHAT, chat_body() | {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, chat_body() | {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    (CHAT, chat_body(content="   "), 400, "messages"),
    (CHAT, chat_body(temperature=3), 400, "temperature"),
    (CHAT, chat_body(top_p=0), 400, "top_p"),
    (CHAT, chat_body(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat_body(max_tokens=100000), 400, "max_tokens"),
    (CHAT, chat_body(n=2), 400, "n"),
    (CHAT, chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (CHAT, chat_body(content="sleep " * 3000), 400, "messages"),
    (CHAT, chat_body(model="no-such-adapter"), 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "sleep " * 3000}, 400, "prompt"),
    ("/v1/nothing-here", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", ERROR_CASES)
def test_error_cases(http, path, body, status, param):
    kwargs = (
        {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    )
    response = http.post(path, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_app_still_answers_after_errors(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_metrics_are_exported(ray_session, http):
    """Ray's Prometheus endpoint on this node carries the app's request metrics."""
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    names = [
        "ray_mistral_qa_requests_total",
        "ray_mistral_qa_request_errors_total",
        "ray_mistral_qa_generated_tokens_total",
        "ray_mistral_qa_time_to_first_token_seconds_bucket",
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [name for name in names if name not in text]
        if not missing:
            break
        time.sleep(2)
    assert not missing


@pytest.fixture(scope="module")
def guarded_url(serve_url, tmp_path_factory):
    """A second app at /guarded: API key from a file, one decoding slot and room for two requests."""
    from ray import serve as ray_serve

    from serve.app import ChatServer, EngineLoader, load_settings

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text("s3cret-key\n")
    settings = load_settings(
        {"engine": {"model": {"source": "random", "name": "tiny-mistral"}, "max_batch_size": 1}, "max_pending": 2}
    )
    # Serve's queue stays the deployment's default (unbounded): the replica's 429 is the only limit.
    app = ChatServer.options(
        max_ongoing_requests=6,
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"MISTRAL_QA_API_KEY_FILE": str(key_file)}}},
    ).bind(EngineLoader(settings.engine), settings)
    ray_serve.run(app, name="guarded", route_prefix="/guarded")
    yield f"{serve_url}/guarded"
    ray_serve.delete("guarded")


def test_api_key(guarded_url):
    body = chat_body(model="base", max_tokens=2)
    missing = requests.post(f"{guarded_url}{CHAT}", json=body, timeout=60)
    wrong = requests.post(f"{guarded_url}{CHAT}", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert "s3cret" not in response.text
    good = OpenAI(base_url=f"{guarded_url}/v1", api_key="s3cret-key", max_retries=0)
    assert [m.id for m in good.models.list()] == ["base"]
    assert requests.get(f"{guarded_url}/health", timeout=60).status_code == 200


def test_saturated_replica_rejects_instead_of_queueing(guarded_url):
    headers = {"Authorization": "Bearer s3cret-key"}
    body = chat_body(model="base", max_tokens=400)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(
            pool.map(
                lambda _: requests.post(f"{guarded_url}{CHAT}", json=body, headers=headers, timeout=120), range(12)
            )
        )
    statuses = [r.status_code for r in responses]
    # The replica holds 2; Serve's unbounded queue lets the rest reach it, and it turns them away
    # with 429 (JSON), never Serve's plain-text 503.
    assert set(statuses) == {200, 429} and statuses.count(200) <= 4, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            assert response.headers["retry-after"] == "1"
    after = requests.post(
        f"{guarded_url}{CHAT}", json=chat_body(model="base", max_tokens=2), headers=headers, timeout=60
    )
    assert after.status_code == 200


def test_a_burst_of_streams_never_gets_more_than_max_pending(guarded_url):
    """Streams are counted from the moment they are accepted: 20 long streams at once, and only
    max_pending (2) get a 200 while the first two are still generating (was up to 6: the count
    started only once a stream began to run)."""
    headers = {"Authorization": "Bearer s3cret-key"}
    body = chat_body(model="base", max_tokens=2000, stream=True)

    def open_stream(_):
        return requests.post(f"{guarded_url}{CHAT}", json=body, headers=headers, stream=True, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(open_stream, range(20)))
    try:
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 2 and statuses.count(429) == 18, statuses
        for response in responses:
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for response in responses:
            response.close()


def replica_actors(app: str) -> list[dict]:
    import ray

    return [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]


@pytest.mark.slow  # ~20 s; the engine-health replacement test is slow too
def test_killed_replica_is_restarted(ray_session, http):
    """Runs last in this module: the app's only replica dies and Serve brings up a new one."""
    [victim] = replica_actors("mistral-qa")
    ray_session.kill(ray_session.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = http.post(CHAT, json=chat_body(max_tokens=3), timeout=30)
            if response.status_code == 200 and replica_actors("mistral-qa") != [victim]:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert response.status_code == 200
    [replacement] = replica_actors("mistral-qa")
    assert replacement["name"] != victim["name"]
