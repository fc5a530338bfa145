"""The Ray Serve application: one deployment whose replicas each hold an Engine behind an
OpenAI-compatible FastAPI router, plus the chat page at `/`.

    serve run serve/config.yaml                   # import_path: serve.app:build_app
    python -m serve --adapter outputs/quickstart/adapter

build_app(args) validates `args` (ServeSettings) before any replica starts. The replica builds
its engine with the loader passed through .bind(...), so tests and other callers can swap it.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views read the route
# signatures at runtime, and string annotations would turn `request: Request` into a query parameter.
import json
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


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as `model`; malformed JSON and invalid fields are 400s with the field named."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise bad_request(message, param=param) from None


@serve.deployment(
    # The engine holds up to ServeSettings.max_pending requests and answers 429 beyond that; Serve's
    # own limits sit above it, so its 503 (plain-text body) is only the last line of defence.
    max_ongoing_requests=80,
    max_queued_requests=128,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(api)
class ChatServer:
    def __init__(self, load_engine: Callable[[], Engine], settings: ServeSettings):
        self.engine = load_engine()
        self.metrics = RequestMetrics()
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

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse(self.service.health())

    @api.get("/v1/models")
    async def models(self, request: Request):
        async def handler():
            return self.service.models()

        return await self._answer(request, "models", handler)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def handler():
            return await self.service.chat(await parse_body(request, ChatCompletionRequest))

        return await self._answer(request, "chat", handler)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        async def handler():
            return await self.service.completions(await parse_body(request, CompletionRequest))

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
