"""The Ray Serve application: one deployment whose replicas each hold an Engine behind an
OpenAI-compatible FastAPI router, plus the chat page at `/`.

    serve run serve/config.yaml                   # import_path: serve.app:build_app
    python -m serve --adapter outputs/quickstart/adapter

build_app(args) validates `args` (ServeSettings) before any replica starts. The replica builds
its engine with the loader passed through .bind(...), so tests and other callers can swap it.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views read the route
# signatures at runtime, and string annotations would turn `request: Request` into a query parameter.
import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import Application

from mistral_qa.adapters import AdapterError, is_remote, resolve_adapter
from mistral_qa.configio import build_config
from mistral_qa.engine import Engine, EngineConfig

from .auth import check_bearer, load_api_key
from .body import check_content_type, parse_json_object, read_body
from .errors import OpenAIError, bad_request, install_handlers, validation_message
from .metrics import RequestMetrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .service import OpenAIService, ServeSettings

log = logging.getLogger("serve")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STATIC = Path(__file__).resolve().parent / "static"

api = FastAPI(title="mistral-qa", description="OpenAI-compatible API for the fine-tuned model.", docs_url="/docs")
install_handlers(api)


class EngineLoader:
    """Builds a replica's Engine from its config (a picklable callable, bound into the app)."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def __call__(self) -> Engine:
        return Engine(self.cfg)


async def parse_body(request: Request, model: type[BaseModel], max_bytes: int) -> BaseModel:
    """The JSON body as `model` (415, 413 and 400s from body.py; invalid fields are 400s naming the field)."""
    check_content_type(request)
    data = parse_json_object(await read_body(request, max_bytes))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, param, code = validation_message(err.errors())
        raise bad_request(message, param=param, code=code) from None


@serve.deployment(
    # The replica admits ServeSettings.max_pending (64) requests and answers 429 (an OpenAI JSON body)
    # beyond that. max_ongoing_requests stays above max_pending, so a full replica still has room to
    # answer those 429s at once, and Serve's own queue is unbounded (-1): Serve never sheds load
    # itself, since its 503 would be a plain-text body. A queued request waits only for a free
    # slot of the 16 spare, which a 429 frees in milliseconds.
    max_ongoing_requests=80,
    max_queued_requests=-1,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(api)
class ChatServer:
    def __init__(self, load_engine: Callable[[], Engine], settings: ServeSettings):
        self.engine = load_engine()
        self.settings = settings
        self.metrics = RequestMetrics(self.engine.model_names)
        self.service = OpenAIService(self.engine, settings, self.metrics)
        self.api_key = load_api_key()
        log.info("serving %s (API key %s)", self.engine.model_names, "required" if self.api_key else "off")

    async def _answer(self, request: Request, endpoint: str, handler):
        try:
            check_bearer(self.api_key, request.headers.get("authorization"))
            return await handler()
        except OpenAIError as err:
            self.metrics.error(endpoint, err.status)
            return err.response()

    def check_health(self) -> None:
        """Serve's health hook (every health_check_period_s): raising marks this replica unhealthy,
        and Serve replaces it. Raises when the engine thread died or hangs."""
        self.engine.check_health()

    def engine_stats(self) -> dict[str, float]:
        """The engine's step-loop counters (mistral_qa.engine.stats), for a deployment handle's caller:
        benchmarks/serve_run.py reads them around a load to see where the replica's steps go."""
        return self.engine.stats()

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            return JSONResponse(self.service.health())
        except OpenAIError as err:
            return err.response()

    @api.get("/v1/models")
    async def models(self, request: Request):
        async def handler():
            return self.service.models()

        return await self._answer(request, "models", handler)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def handler():
            body = await parse_body(request, ChatCompletionRequest, self.settings.max_body_bytes)
            return await self.service.chat(body)

        return await self._answer(request, "chat", handler)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        async def handler():
            body = await parse_body(request, CompletionRequest, self.settings.max_body_bytes)
            return await self.service.completions(body)

        return await self._answer(request, "completions", handler)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def local_path(location: str) -> str:
    """A local adapter location made absolute: against the current directory, else the project root."""
    if is_remote(location):
        return location
    path = Path(location).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.exists():
            return str(resolve_adapter(str(candidate)))
    raise AdapterError(f"adapter {location!r}: no such folder (looked in {', '.join(str(c) for c in candidates)})")


def load_settings(args: dict) -> ServeSettings:
    """Validate application args; local adapter paths become absolute so replicas find them anywhere."""
    settings = build_config(ServeSettings, dict(args))
    adapters = {name: local_path(location) for name, location in settings.engine.adapters.items()}
    settings.engine = settings.engine.model_copy(update={"adapters": adapters})
    return settings


def build_app(args: dict) -> Application:
    """Application builder for `serve run` / `serve deploy` / KubeRay (import_path serve.app:build_app)."""
    settings = load_settings(args)
    return ChatServer.bind(EngineLoader(settings.engine), settings)
