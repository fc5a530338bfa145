"""serve/config.yaml against Ray's schema and ours, and the `python -m serve` command line (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from mistral_qa.adapters import AdapterError
from mistral_qa.configio import ConfigError, build_config
from serve.__main__ import adapters_from_flags, app_spec, main, parse_args
from serve.app import ChatServer, build_app, load_settings
from serve.auth import load_api_key
from serve.service import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "serve" / "config.yaml"


def test_config_file_is_a_valid_serve_config():
    text = CONFIG.read_text()
    assert text.startswith("# serve run serve/config.yaml")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    [app] = schema.applications
    assert app.import_path == "serve.app:build_app"
    [deployment] = app.deployments
    assert deployment.name == ChatServer.name
    assert deployment.autoscaling_config and deployment.ray_actor_options.num_gpus == 0
    settings = build_config(ServeSettings, app.args)
    assert settings.engine.adapters == {"mobile-health": "outputs/quickstart/adapter"}


def test_serve_never_sheds_load_before_the_replica():
    """Serve's own 503 is plain text; the replica's 429 is an OpenAI body. So Serve's queue is
    unbounded and each replica takes more requests than it admits, leaving room to answer 429s."""
    [app] = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text())).applications
    [deployment] = app.deployments
    settings = build_config(ServeSettings, app.args)
    for queued, ongoing in [
        (deployment.max_queued_requests, deployment.max_ongoing_requests),
        (ChatServer._deployment_config.max_queued_requests, ChatServer._deployment_config.max_ongoing_requests),
    ]:
        assert queued == -1
        assert ongoing > settings.max_pending


def fake_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return folder


def test_relative_adapter_paths_become_absolute(tmp_path, monkeypatch):
    fake_adapter(tmp_path / "outputs" / "run" / "adapter")
    monkeypatch.chdir(tmp_path)
    settings = load_settings({"engine": {"adapters": {"a": "outputs/run/adapter"}}})
    assert settings.engine.adapters["a"] == str(tmp_path / "outputs" / "run" / "adapter")
    with pytest.raises(AdapterError, match="outputs/missing/adapter"):
        build_app({"engine": {"adapters": {"a": "outputs/missing/adapter"}}})
    with pytest.raises(ConfigError, match="max_pending"):
        load_settings({"engine": {"adapters": {"a": "outputs/run/adapter"}}, "max_pending": 0})


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["outputs/q/adapter"], {"mobile-health": "outputs/q/adapter"}),
        (["a=outputs/a/adapter", "b=s3://bucket/b/adapter"], {"a": "outputs/a/adapter", "b": "s3://bucket/b/adapter"}),
        (["s3://bucket/x=y/adapter"], {"mobile-health": "s3://bucket/x=y/adapter"}),
    ],
)
def test_adapter_flags(flags, expected):
    assert adapters_from_flags(flags, "mobile-health") == expected


def test_unnamed_adapters_must_be_named():
    with pytest.raises(ConfigError, match="NAME=PATH"):
        adapters_from_flags(["one/adapter", "two/adapter"], "x")


def test_config_file_flags_and_overrides_combine():
    args = parse_args(["--config", str(CONFIG), "--adapter", "/tmp/a", "--port", "8123", "engine.max_batch_size=4"])
    app_args, options, http = app_spec(args)
    assert app_args["engine"]["adapters"] == {"mobile-health": "/tmp/a"}
    assert app_args["engine"]["max_batch_size"] == 4 and app_args["max_pending"] == 64
    assert options["autoscaling_config"]["max_replicas"] == 2 and "name" not in options
    assert http == {"host": "127.0.0.1", "port": 8123}


def test_cli_fails_fast_on_a_missing_adapter(tmp_path, capsys):
    assert main(["--adapter", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main([]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_api_key_sources(tmp_path):
    assert load_api_key({}) is None
    assert load_api_key({"MISTRAL_QA_API_KEY": " k1 "}) == "k1"
    (tmp_path / "key").write_text("k2\n")
    assert load_api_key({"MISTRAL_QA_API_KEY_FILE": str(tmp_path / "key")}) == "k2"
    with pytest.raises(RuntimeError, match="does not exist"):
        load_api_key({"MISTRAL_QA_API_KEY_FILE": str(tmp_path / "nope")})
