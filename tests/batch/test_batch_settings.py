"""The batch job's `generation:` section is the shared sampling schema: a bad setting fails at config
validation (before Ray, naming the key), and every setting reaches the engine and the output columns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from batch.__main__ import main
from batch.config import BatchJobConfig
from batch.io import INPUT_SCHEMA
from batch.output import OUTPUT_SCHEMA
from batch.pipeline import Answerer, build_prompts
from mistral_qa.configio import ConfigError, load_config
from mistral_qa.engine.stats import EngineStats
from mistral_qa.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "batch" / "configs" / "tiny.yaml"
SETTINGS = [
    "generation.temperature=0.7",
    "generation.top_k=5",
    "generation.presence_penalty=0.5",
    "generation.frequency_penalty=-0.25",
    "generation.seed=11",
    "generation.stop=[END]",
    "generation.structured={type: json_object}",
]


@pytest.mark.parametrize(
    "override, key",
    [
        ("generation.temperature=3", "generation.temperature"),
        ("generation.top_k=-2", "generation.top_k"),
        ("generation.presence_penalty=2.5", "generation.presence_penalty"),
        ("generation.structured={type: json_schema}", "generation.structured"),
        # a schema the grammar library cannot compile fails here, not as every row's generation error
        ("generation.structured={type: json_schema, json_schema: {type: strin}}", "generation.structured"),
    ],
)
def test_a_setting_the_engine_refuses_fails_at_config_validation(tmp_path, capsys, override, key):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Why?"}) + "\n")
    paths = ["--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "out")]
    assert main(["--config", str(TINY), *paths, override]) == 2  # 2: a config error, before Ray starts
    assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_slots_need_a_whole_gpu_per_actor():
    """max_batch_size=auto fills the card's free memory: two actors sharing a card would not both fit."""
    gpu = ROOT / "batch" / "configs" / "mistral7b.yaml"
    assert load_config(BatchJobConfig, gpu, []).engine.max_batch_size == "auto"
    with pytest.raises(ConfigError, match="compute.num_gpus_per_actor=0.5 give engine.max_batch_size a number"):
        load_config(BatchJobConfig, gpu, ["compute.num_gpus_per_actor=0.5"])
    shared = load_config(BatchJobConfig, gpu, ["compute.num_gpus_per_actor=0.5", "engine.max_batch_size=64"])
    assert shared.engine.max_batch_size == 64


def test_yaml_configs_keep_their_generation_keys():
    for path in sorted((ROOT / "batch" / "configs").glob("*.yaml")):
        cfg = load_config(BatchJobConfig, path, [])
        assert cfg.generation.temperature == 0.0 and cfg.generation.max_tokens >= 1, path
    with pytest.raises(ConfigError, match="generation.max_tokenz: unknown key"):
        load_config(BatchJobConfig, TINY, ["generation.max_tokenz=3"])


@dataclass
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ParamsRecordingEngine:
    """Answers every prompt with "{}" and keeps the SamplingParams and template stop strings it was given."""

    max_context = 100
    model_config = SimpleNamespace(name="recorder")

    def __init__(self):
        self.params: list[SamplingParams] = []
        self.template_stops: list[tuple[str, ...]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stats(self, since=None) -> dict:
        return EngineStats().snapshot()

    def generate(self, prompts, params, adapter=None, template_stop=()):
        self.params.append(params)
        self.template_stops.append(tuple(template_stop))
        return [Answer("{}", "stop", 3, 1) for _ in prompts]


def test_every_setting_reaches_the_engine_and_the_output_columns():
    cfg = load_config(BatchJobConfig, TINY, SETTINGS)
    answerer = Answerer(cfg.model_dump(mode="json"), pa.array([], pa.string()), lambda _: ParamsRecordingEngine())
    rows = [{"id": "a", "question": "Why?", "context": None, "error": None}]
    out = answerer(build_prompts(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)))
    assert answerer.engine.params == [SamplingParams(**cfg.generation.model_dump())]
    assert answerer.engine.template_stops == [("\n###",)]  # no adapter: the base answers in the alpaca template
    assert out.schema.equals(OUTPUT_SCHEMA)
    [row] = out.to_pylist()
    expected = {"temperature": 0.7, "top_k": 5, "presence_penalty": 0.5, "frequency_penalty": -0.25, "seed": 11}
    assert {k: row[k] for k in expected} == expected
    assert row["stop"] == ["END"] and json.loads(row["structured"]) == {"type": "json_object", "json_schema": None}


BOOLEAN_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.mark.slow  # a Ray Data job (~20-40 s on 2 cores)
def test_structured_output_works_end_to_end_in_the_batch_job(ray_session, tmp_path, capsys):
    """generation.structured reaches the engine's grammar: every answer of the tiny random model is JSON
    that matches the schema, and the output records the schema."""
    import jsonschema

    from batch.output import read_answers

    with (tmp_path / "q.jsonl").open("w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"q{i}", "question": f"Is screen time {i} fine?"}) + "\n")
    schema = json.dumps({"type": "json_schema", "json_schema": BOOLEAN_SCHEMA})
    paths = ["--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "out")]
    assert main(["--config", str(TINY), *paths, "generation.max_tokens=32", f"generation.structured={schema}"]) == 0
    rows = read_answers(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 6 and all(r["error"] is None and r["finish_reason"] == "stop" for r in rows), rows
    for row in rows:
        jsonschema.validate(json.loads(row["answer"]), BOOLEAN_SCHEMA)
        assert json.loads(row["structured"]) == json.loads(schema)
