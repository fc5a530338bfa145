"""engine.compile_cache: a first engine saves what its warm-up compiled, a second engine in a fresh
process loads it and compiles from it (torch's FX graph cache hits), giving the same tokens; a
corrupt file is ignored with a warning and the engine answers as without a cache.

On CPU the engine runs eagerly (engine.compile is for CUDA), so the compiled case swaps in the
CUDA-shaped compiled decode steps, as tests/engine/test_gpu_shaped_paths.py does, and warms up again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.compile_cache import CompileCache, cache_key
from tests.conftest import ROOT

TINY = ModelConfig(source="random", name="tiny-mistral")

# One engine in a fresh process: CUDA-shaped compiled decode steps on the CPU, warmed up through the
# compile cache; prints what start-up did, torch's FX graph cache counters and greedy tokens.
COMPILED_ENGINE = """
import json, sys
from torch._dynamo.utils import counters
from mistral_qa.config import ModelConfig
from mistral_qa.engine import Engine, EngineConfig, SamplingParams
from mistral_qa.engine.graphs import DecodeSteps

cfg = EngineConfig(model=ModelConfig(source="random", name="tiny-mistral"), max_batch_size=4, compile_cache=sys.argv[1])
engine = Engine(cfg)
engine.runner.steps = DecodeSteps(engine.runner.decoder, compile=True, padded=True)
engine.warm_up()
out = engine.generate(["Is texting while walking dangerous?", "Hi"], SamplingParams(max_tokens=8, temperature=0.0))
print("RESULT " + json.dumps({
    "cache": engine.startup["compile_cache"],
    "compile_s": engine.startup["compile_s"],
    "hits": counters["inductor"]["fxgraph_cache_hit"],
    "misses": counters["inductor"]["fxgraph_cache_miss"],
    "tokens": [c.token_ids for c in out],
}))
engine.close()
"""


def run_compiled_engine(cache: Path, inductor_dir: Path) -> dict:
    """COMPILED_ENGINE in a fresh process with its own empty Inductor cache, so only the compile
    cache's artifact can make its compile warm."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_ENGINE, str(cache)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow  # two CPU compiles in fresh processes: minutes
def test_second_engine_loads_the_first_ones_artifacts(tmp_path):
    cache = tmp_path / "compile-cache"
    first = run_compiled_engine(cache, tmp_path / "inductor-1")
    assert (
        first["cache"]["status"] == "missing"
        and first["cache"]["save"] == "saved"
        and first["cache"]["saved_bytes"] > 0
    )
    assert first["hits"] == 0 and first["misses"] > 0
    assert first["compile_s"] > 0  # the start-up report counts the warm-up's compiling
    assert [p.name for p in cache.iterdir()] == [first["cache"]["file"]]  # no temporary file left behind

    second = run_compiled_engine(cache, tmp_path / "inductor-2")
    assert (
        second["cache"]["status"] == "loaded"
        and second["cache"]["save"] == ""
        and second["cache"]["loaded_bytes"] == first["cache"]["saved_bytes"]
    )
    assert second["hits"] > 0 and second["misses"] == 0  # every graph came from the artifact
    assert 0 < second["compile_s"]  # Dynamo still traces: the artifact holds Inductor's output
    assert second["tokens"] == first["tokens"]


def test_corrupt_file_is_ignored_with_a_warning(tmp_path, caplog):
    """An engine whose keyed file holds garbage warns, starts without it and answers as before."""
    cfg = EngineConfig(model=TINY, max_batch_size=2, max_context=64, compile_cache=str(tmp_path))
    params = SamplingParams(max_tokens=6, temperature=0.0)
    first = Engine(cfg)
    try:
        report = first.startup["compile_cache"]
        assert report["status"] == "missing" and report["save"] == "nothing compiled"  # CPU: runs eagerly
        expected = [c.token_ids for c in first.generate(["Hi"], params)]
    finally:
        first.close()
    (tmp_path / report["file"]).write_bytes(b"not a torch artifact")
    with caplog.at_level(logging.WARNING, logger="mistral_qa.engine.compile_cache"):
        engine = Engine(cfg)
    try:
        assert engine.startup["compile_cache"]["status"] == "ignored"
        assert any(f"compile cache: ignoring {tmp_path / report['file']}" in r.getMessage() for r in caplog.records)
        assert [c.token_ids for c in engine.generate(["Hi"], params)] == expected
    finally:
        engine.close()


def test_loading_an_empty_or_truncated_file_is_ignored(tmp_path, caplog):
    (tmp_path / "a.bin").write_bytes(b"")
    cache = CompileCache(str(tmp_path), "a.bin")
    with caplog.at_level(logging.WARNING, logger="mistral_qa.engine.compile_cache"):
        cache.load()
    assert cache.report.status == "ignored" and cache.report.loaded_bytes == 0
    assert "compile cache: ignoring" in caplog.text


def test_key_follows_what_shapes_the_compiled_graphs():
    model = {"hidden_size": 8, "num_hidden_layers": 2, "_name_or_path": "/somewhere"}
    shape = {"device": "cuda12.8-sm90", "dtype": "torch.float16", "max_batch_size": 256, "prefill_tokens": 1024}
    key = cache_key(model, shape)
    assert key.startswith("engine-torch") and "cuda12.8-sm90" in key and key.endswith(".bin")
    assert cache_key({**model, "_name_or_path": "/elsewhere"}, shape) == key  # where it came from: not its shape
    assert cache_key({**model, "hidden_size": 16}, shape) != key
    assert cache_key(model, {**shape, "max_batch_size": 128}) != key
    assert cache_key(model, {**shape, "device": "cuda12.8-sm80"}) != key


def test_the_setting_reaches_serve_and_batch_configs():
    """engine.compile_cache is an EngineSettings field, so serve's and the batch job's configs take it
    as an override, and a wrong type is refused naming the field."""
    from batch.config import BatchJobConfig
    from mistral_qa.configio import load_config
    from serve.__main__ import app_spec, parse_args
    from serve.service import ServeSettings

    app_args, _, _ = app_spec(
        parse_args(["--config", str(ROOT / "serve" / "config.yaml"), "engine.compile_cache=/shared/cc"])
    )
    assert ServeSettings.model_validate(app_args).engine.compile_cache == "/shared/cc"
    cfg = load_config(
        BatchJobConfig, ROOT / "batch" / "configs" / "quickstart.yaml", ["engine.compile_cache=s3://b/cc"]
    )
    assert cfg.engine.compile_cache == "s3://b/cc"
    with pytest.raises(Exception, match="compile_cache"):
        load_config(BatchJobConfig, ROOT / "batch" / "configs" / "quickstart.yaml", ["engine.compile_cache.x=1"])


def test_an_unusable_location_is_logged_not_raised(caplog):
    """A URI pyarrow cannot open (bad scheme, no credentials, no network) costs the warm start only."""
    cache = CompileCache("nosuchscheme://bucket/cc", "a.bin")
    with caplog.at_level(logging.WARNING, logger="mistral_qa.engine.compile_cache"):
        cache.load()
        cache.save()
    assert (cache.report.status, cache.report.save) == ("ignored", "failed")
    assert "nosuchscheme" in caplog.text
