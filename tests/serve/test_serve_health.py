"""A replica whose engine thread died: /health says 503 (OpenAI body), Serve's health check
(ChatServer.check_health -> Engine.check_health) marks the replica unhealthy, and Serve replaces it.

The engine is real (the tiny random Mistral); the thread death is real too: a prompt carrying
KILL_WORD makes the step loop raise SystemExit, which the engine thread does not survive."""

from __future__ import annotations

import sys
import time

import pytest
import requests
from ray import cloudpickle

from serve.app import EngineLoader

KILL_WORD = "kill-the-engine-thread"
# Replicas cannot import this test module: its loader travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class BreakableEngineLoader(EngineLoader):
    """A real engine whose step loop dies (SystemExit, not an Exception) on a prompt with KILL_WORD."""

    def __call__(self):
        engine = super().__call__()
        runner = engine.runner
        step, add = runner.step, runner.add
        doomed = []

        def add_and_watch(request):
            if KILL_WORD in engine.tokenizer.decode(request.prompt_ids):
                doomed.append(request)
            add(request)

        def step_or_die():
            if doomed:
                raise SystemExit("test: the engine thread dies")
            step()

        runner.add, runner.step = add_and_watch, step_or_die
        return engine


def replica_names(app: str) -> set[str]:
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in actors if a["name"].startswith(f"SERVE_REPLICA::{app}#")}


@pytest.mark.slow
def test_dead_engine_thread_is_reported_and_the_replica_replaced(serve_url):
    from ray import serve as ray_serve

    from serve.app import ChatServer, load_settings

    settings = load_settings({"engine": {"model": {"source": "random", "name": "tiny-mistral"}, "max_batch_size": 1}})
    app = ChatServer.options(health_check_period_s=1, health_check_timeout_s=10, ray_actor_options={"num_cpus": 0.5})
    ray_serve.run(app.bind(BreakableEngineLoader(settings.engine), settings), name="sick", route_prefix="/sick")
    url = f"{serve_url}/sick"
    try:
        [first] = replica_names("sick")
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        body = {"model": "base", "prompt": f"please {KILL_WORD}", "max_tokens": 4}
        try:
            requests.post(f"{url}/v1/completions", json=body, timeout=5)
        except requests.Timeout:
            pass  # the engine will never answer it
        health = requests.get(f"{url}/health", timeout=30)
        if first in replica_names("sick"):  # not yet replaced: the replica itself says it is unhealthy
            assert health.status_code == 503, health.text
            assert health.json()["error"]["code"] == "engine_unhealthy"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (first in replica_names("sick") or not replica_names("sick")):
            time.sleep(1)
        assert first not in replica_names("sick"), "Serve kept the replica whose engine thread died"
        reply = requests.post(f"{url}/v1/completions", json={**body, "prompt": "hello"}, timeout=120)
        assert reply.status_code == 200
    finally:
        ray_serve.delete("sick")
