"""k8s/monitoring: the PodMonitor selects the project's Ray pods on KubeRay's metrics port, and every
series the Grafana dashboard plots is one that Ray and the chatbot export (checked by name and type
here, and against a live Serve app's metrics endpoint in the slow test)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
SUFFIX = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",)}
# Ray Serve's own series the dashboard uses, with their types (names checked against Ray's source).
SERVE_BUILTINS = {
    "serve_deployment_replica_healthy": "Gauge",
    "serve_deployment_processing_latency_ms": "Histogram",
    "serve_deployment_request_counter": "Counter",
    "serve_deployment_error_counter": "Counter",
}


def dashboard_series() -> set[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for e in exprs for name in re.findall(r"\bray_[a-z0-9_]+", e) if name != "ray_io_cluster"}


def chatbot_metrics() -> dict[str, str]:
    """name -> Counter/Histogram/Gauge, as serve/metrics.py declares them."""
    source = (ROOT / "serve" / "metrics.py").read_text()
    return {name: kind for kind, name in re.findall(r"metrics\.(Counter|Histogram|Gauge)\(\s*\"([a-z0-9_]+)\"", source)}


def expected(kinds: dict[str, str]) -> set[str]:
    return {f"ray_{name}{suffix}" for name, kind in kinds.items() for suffix in SUFFIX[kind]}


def test_the_pod_monitor_scrapes_the_projects_ray_pods():
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels["app.kubernetes.io/name"] == "mistral-qa" and labels["ray.io/is-ray-node"] == "yes"
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # every Ray pod template of the manifests carries the labels the selector matches on
    for manifest in ("raycluster.yaml", "rayservice-chat.yaml", "rayjob-train.yaml", "rayjob-batch.yaml"):
        text = (ROOT / "k8s" / manifest).read_text()
        assert "app.kubernetes.io/name: mistral-qa" in text, manifest


def test_every_dashboard_series_is_exported():
    ours, series = chatbot_metrics(), dashboard_series()
    assert ours, "no metrics found in serve/metrics.py"
    known = expected(ours) | expected(SERVE_BUILTINS)
    assert series and series <= known, sorted(series - known)
    ray_serve = "\n".join(p.read_text() for p in (Path(pytest.importorskip("ray.serve").__file__).parent).rglob("*.py"))
    for name in SERVE_BUILTINS:
        assert f'"{name}"' in ray_serve, f"Ray Serve no longer exports {name}"


@pytest.mark.slow
def test_a_live_serve_app_exports_the_chatbot_series(serve_url, ray_session):
    """One request through the session's Serve app, then Ray's metrics endpoint on this node shows
    each of the chatbot's series the dashboard plots (Ray flushes metrics every few seconds)."""
    import requests

    reply = requests.post(f"{serve_url}/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    # a client's made-up model name is counted under one label, never as a series of its own
    bogus = requests.post(f"{serve_url}/v1/completions", json={"model": "made-up-1234", "prompt": "Hi"})
    assert bogus.status_code == 404, bogus.text
    port = ray_session.nodes()[0]["MetricsExportPort"]
    wanted = {s for s in dashboard_series() if s.startswith("ray_mistral_qa_")}
    deadline, missing = time.monotonic() + 90, wanted
    while missing and time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        missing = {s for s in wanted if not re.search(rf"^{s}[{{ ]", text, re.M)}
        time.sleep(3)
    assert not missing, sorted(missing)
    deadline = time.monotonic() + 60
    while 'model="unknown"' not in text and time.monotonic() < deadline:
        time.sleep(3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'model="unknown"' in text and "made-up-1234" not in text
