"""Request metrics, exported by Ray to Prometheus (each node's metrics port, names prefixed ray_).

Serve adds deployment, replica, application and route tags by itself.
"""

from __future__ import annotations

from ray.serve import metrics

# Seconds; first tokens on CPU can take a while, GPU ones a few milliseconds.
TTFT_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


UNKNOWN_MODEL = "unknown"  # the label of requests for a model this replica does not serve


class RequestMetrics:
    def __init__(self, model_names: list[str]):
        # Labels come from this list only: a client's `model` string would make unbounded series.
        self.model_names = set(model_names)
        self.requests = metrics.Counter(
            "mistral_qa_requests", description="Generation requests received.", tag_keys=("model", "endpoint")
        )
        self.errors = metrics.Counter(
            "mistral_qa_request_errors", description="Requests answered with an error.", tag_keys=("endpoint", "status")
        )
        self.ttft = metrics.Histogram(
            "mistral_qa_time_to_first_token_seconds",
            description="From request arrival to the first generated token.",
            boundaries=TTFT_BOUNDARIES,
            tag_keys=("model",),
        )
        self.tokens = metrics.Counter(
            "mistral_qa_generated_tokens", description="Completion tokens generated.", tag_keys=("model",)
        )
        self.pending = metrics.Gauge("mistral_qa_pending_requests", description="Requests in this replica's engine.")

    def request(self, model: str, endpoint: str) -> None:
        label = model if model in self.model_names else UNKNOWN_MODEL
        self.requests.inc(tags={"model": label, "endpoint": endpoint})

    def error(self, endpoint: str, status: int) -> None:
        self.errors.inc(tags={"endpoint": endpoint, "status": str(status)})

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model})

    def finished(self, model: str, completion_tokens: int) -> None:
        self.tokens.inc(completion_tokens, tags={"model": model})

    def set_pending(self, value: int) -> None:
        self.pending.set(value)
