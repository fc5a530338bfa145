"""Serve a fine-tuned adapter behind an OpenAI-compatible API (and a chat page) on local Ray.

    python -m serve --adapter outputs/quickstart/adapter                  # model "mobile-health"
    python -m serve --adapter outputs/quickstart/adapter --name quickstart --port 8080
    python -m serve --adapter a=outputs/run-a/adapter --adapter b=s3://bucket/run-b/adapter
    python -m serve --config serve/config.yaml engine.max_batch_size=8   # a Serve config file + overrides

Overrides are `key.sub=value` on the application args (see ServeSettings in serve/service.py).
It blocks until Ctrl-C; the URL is printed once the app answers.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from mistral_qa.adapters import AdapterError
from mistral_qa.configio import ConfigError, apply_override, parse_override, read_yaml
from mistral_qa.entry import CONFIG_ERROR, prog, report, run_main

from .ready import wait_until_ready

DEFAULT_NAME = "mobile-health"
APP_NAME = "mistral-qa"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("python -m serve"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="PATH or NAME=PATH (repeatable); "
        "an adapter folder, a Ray Train checkpoint folder, or an s3:// / gs:// URI",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="model name of a single unnamed --adapter")
    parser.add_argument("--config", help="a Serve config file (ServeDeploySchema), e.g. serve/config.yaml")
    parser.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the application args")
    return parser.parse_args(argv)


def adapters_from_flags(flags: list[str], name: str) -> dict[str, str]:
    adapters = {}
    for flag in flags:
        key, sep, location = flag.partition("=")
        # s3://x=y has '=' after the scheme; only a bare NAME before '=' names the adapter.
        if sep and "/" not in key and ":" not in key:
            adapters[key] = location
        elif len(flags) == 1:
            adapters[name] = flag
        else:
            raise ConfigError(f"--adapter {flag!r}: with several adapters, name each one NAME=PATH")
    return adapters


def app_spec(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(application args, deployment options, http options) from --config, flags and overrides."""
    app_args: dict = {}
    options: dict = {}
    http: dict = {"host": "127.0.0.1", "port": 8000}
    if args.config:
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(read_yaml(args.config))
        app = schema.applications[0]
        app_args = dict(app.args)
        if app.deployments:
            options = app.deployments[0].model_dump(exclude_unset=True, exclude={"name"})
        http.update(schema.http_options.model_dump(include={"host", "port"}, exclude_unset=True))
    if args.adapter:
        engine = dict(app_args.get("engine") or {})
        engine["adapters"] = adapters_from_flags(args.adapter, args.name)
        app_args["engine"] = engine
    for text in args.overrides:
        apply_override(app_args, *parse_override(text))
    if not app_args.get("engine"):
        raise ConfigError("nothing to serve: give --adapter PATH or --config serve/config.yaml")
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    return app_args, options, http


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: serve_until_stopped(args))


def serve_until_stopped(args: argparse.Namespace) -> int:
    try:
        app_args, options, http = app_spec(args)
        from .app import ChatServer, EngineLoader, load_settings  # imports Ray: only once the flags are valid

        settings = load_settings(app_args)
    except (AdapterError, ValueError) as err:  # ConfigError is a ValueError; all are the flags' or config's fault
        return report(err, CONFIG_ERROR)
    import ray
    from ray import serve

    ray.init()
    serve.start(http_options=http)
    app = ChatServer.options(**options).bind(EngineLoader(settings.engine), settings)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{http['host']}:{http['port']}"
    wait_until_ready(url)
    names = ", ".join([*([] if settings.engine.merge_adapter else ["base"]), *settings.engine.adapters])
    print(f"serving {names} at {url}  (chat page: {url}/ , OpenAI API: {url}/v1)  Ctrl-C to stop", flush=True)
    # SIGTERM (docker stop, kill) and a SIGINT that a parent shell set to ignore both stop cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
