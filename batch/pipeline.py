"""The Ray Data pipeline: read questions -> prompts and answers on an actor pool -> write Parquet.

Everything streams: read tasks emit blocks, a streaming repartition cuts them into blocks of exactly
`compute.batch_size` rows, the actor pool answers one such block a call, and the write operator turns
about `output.rows_per_file` rows into one atomically written Parquet file. No step holds the whole
input.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext

from mistral_qa.local_ray import start_ray
from mistral_qa.preflight import PreflightError, absolute, require_gpus
from mistral_qa.templates import AlpacaTemplate, PromptTemplate, instruction_prompt

from .config import BatchJobConfig
from .io import InputFiles, QuestionDatasource, check_question_column, list_inputs
from .output import OUTPUT_SCHEMA, AnswerDatasink, check_output, prepare_output, setting_columns
from .retry import drop_failed_rows
from .timing import JobClock, Marks, TimeSplit, read_clock, split, tell

log = logging.getLogger("batch")
ADAPTER_NAME = "batch"


def build_prompts(batch: pa.Table, template: PromptTemplate | None = None) -> pa.Table:
    """The batch with a prompt column in the adapter's template (alpaca when None) for every answerable
    row (None where the row has an error); a prompt column already there is replaced."""
    if template is None:
        template = AlpacaTemplate(None)  # alpaca prompts are plain text: no tokenizer needed
    columns = [batch.column(name).to_pylist() for name in ("question", "context", "error")]
    prompts = [
        None if err else instruction_prompt(template, q, ctx or "") for q, ctx, err in zip(*columns, strict=True)
    ]
    if "prompt" in batch.column_names:
        batch = batch.drop_columns(["prompt"])
    return batch.append_column("prompt", pa.array(prompts, pa.string()))


def make_engine(cfg: BatchJobConfig):
    """The shared generation engine, built from the job config (runs inside each actor)."""
    from mistral_qa.engine import Engine, EngineConfig

    return Engine(
        EngineConfig(
            model=cfg.model,
            adapters={ADAPTER_NAME: cfg.adapter} if cfg.adapter else {},
            **cfg.engine.model_dump(),
        )
    )


def sampling_params(cfg: BatchJobConfig):
    """Every generation setting, as the engine takes them (the template's own stop strings go with each call)."""
    from mistral_qa.engine import SamplingParams

    return SamplingParams(**cfg.generation.model_dump())


def generate_with_retries(
    engine, prompts: list[str], params, adapter: str | None, retries: int, template_stop: tuple[str, ...] = ()
) -> list:
    """Completions for `prompts`, in order; a row that still fails on its own gets its exception instead.

    A failing engine batch is retried `retries` times, then answered row by row, so one poisoned
    row (or a batch too large for the memory left) never takes the others down with it.
    """
    if not prompts:
        return []
    for attempt in range(retries + 1):
        try:
            return engine.generate(prompts, params, adapter=adapter, template_stop=template_stop)
        except Exception as err:  # any engine failure is retried, then isolated per row
            log.warning("engine batch of %d failed (attempt %d/%d): %r", len(prompts), attempt + 1, retries + 1, err)
            _free_accelerator_memory()
    results: list = []
    for prompt in prompts:
        try:
            results.extend(engine.generate([prompt], params, adapter=adapter, template_stop=template_stop))
        except Exception as err:
            results.append(err)
    return results


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Answerer:
    """Ray Data actor: owns one engine, answers a batch of rows, returns OUTPUT_SCHEMA rows.

    Rows already in the output (resume) are dropped here; the set of their ids is built once per actor.
    Calls may run at once in several threads (compute.calls_per_actor): they share only the engine,
    whose generate is thread-safe, and read-only state.
    """

    def __init__(self, job: dict, done_ids, engine_factory: Callable | None = None, clock=None):
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # this actor's own process
        started = time.perf_counter()
        # Where the actor's start went, besides the engine's own parts: the worker process's age when
        # this constructor began, and the whole engine build (its imports, load and warm-up).
        process_s = time.time() - psutil.Process().create_time()
        cfg = BatchJobConfig.model_validate(job)
        self.engine = (engine_factory or make_engine)(cfg)
        engine_s = time.perf_counter() - started
        log.info("answerer: engine ready in %.1f s", engine_s)
        self.clock = clock  # the job's JobClock (timing.py); None outside a job
        startup = {**getattr(self.engine, "startup", {}), "process_s": process_s, "engine_build_s": engine_s}
        tell(clock, "engine_ready", time.time(), startup)
        self.ready_stats = self.engine.stats()  # the warm-up (and its CUDA graph captures) is not the job's
        self.params = sampling_params(cfg)
        self.adapter = ADAPTER_NAME if cfg.adapter else None
        from mistral_qa.adapters import adapter_templates  # here: the driver does not import torch

        # Questions are asked in the template the adapter learned (training_config.yaml); the base: alpaca.
        adapters = {ADAPTER_NAME: cfg.adapter} if cfg.adapter else {}
        found = adapter_templates(adapters, self.engine.tokenizer).get(ADAPTER_NAME) if adapters else None
        self.template = found or AlpacaTemplate(None)  # its stop strings end each answer too
        self.retries = cfg.compute.batch_retries
        done = ray.get(done_ids) if isinstance(done_ids, ray.ObjectRef) else done_ids
        self.done = set(done.to_pylist())
        self.constants = {
            "model": self.engine.model_config.name,
            "adapter": cfg.adapter,
            **setting_columns(cfg.generation),
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for r in build_prompts(batch, self.template).to_pylist() if r["id"] not in self.done]
        for row in rows:
            row.update(answer="", finish_reason=None, prompt_tokens=None, completion_tokens=0)
            if row["error"] is None:
                self._check_length(row)
        todo = [r for r in rows if r["error"] is None]
        started = time.time()
        results = generate_with_retries(
            self.engine, [r["prompt"] for r in todo], self.params, self.adapter, self.retries, self.template.stop
        )
        ended = time.time()
        if todo:
            tell(self.clock, "engine_call", started, ended)
        tokens = sum(r.completion_tokens for r in results if not isinstance(r, Exception))
        # The wall-clock span too: calls of one actor may overlap (compute.calls_per_actor).
        log.info(
            "answerer: %d rows, %d tokens in %.2f s, from %.3f to %.3f",
            len(todo),
            tokens,
            ended - started,
            started,
            ended,
        )
        self._log_engine_stats()
        for row, result in zip(todo, results, strict=True):
            if isinstance(result, Exception):
                row["error"] = f"generation_failed: {type(result).__name__}: {result}"
            else:
                row.update(
                    answer=result.text, finish_reason=result.finish_reason, completion_tokens=result.completion_tokens
                )
        return pa.Table.from_pylist([{**row, **self.constants} for row in rows], schema=OUTPUT_SCHEMA)

    def _log_engine_stats(self) -> None:
        """Where the engine's time went since it was ready, cumulative: calls overlap
        (compute.calls_per_actor), so a window of one call would hold the other call's steps too; the
        actor's last line is its total. benchmarks/batch_job.py parses this line. ms/step is the
        step loop's busy time (prefill included) per decode step; context is the mean cache columns
        attention read per step (its padded shape) against the mean longest row."""
        from mistral_qa.engine.stats import summary  # here: the driver does not import the engine (torch)

        s = summary(self.engine.stats(since=self.ready_stats))
        log.info(
            "answerer: engine since ready: %d steps, %.1f ms/step, %.1f rows/step, context %.0f cols for longest "
            "%.0f, busy %.2f s, launch %.2f s, GPU wait %.2f s, text %.2f s, prefill %.2f s (%d calls, %d prompts, "
            "%d tokens), graphs %d (%.2f s)",
            s["steps"],
            s["ms_per_step"],
            s["rows_per_step"],
            s["context_cols"],
            s["longest"],
            s["busy_s"],
            s["launch_s"],
            s["gpu_wait_s"],
            s["text_s"],
            s["prefill_s"],
            s["prefill_calls"],
            s["prefill_prompts"],
            s["prefill_tokens"],
            s["graphs"],
            s["capture_s"],
        )

    def _check_length(self, row: dict) -> None:
        # The engine refuses a prompt that leaves no room for one answer token; an answer that reaches
        # the context limit ends early with finish_reason "length".
        row["prompt_tokens"] = n = self.engine.count_tokens(row["prompt"])
        if n >= self.engine.max_context:
            row["error"] = f"too_long: the prompt is {n} tokens; the context is {self.engine.max_context}"


@dataclass
class Summary:
    """What the job did, for the final report."""

    output: str
    rows: int = 0  # answered in this run
    skipped: int = 0
    retried: int = 0  # earlier generation_failed rows answered again
    files: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    errors: Counter = field(default_factory=Counter)
    timing: TimeSplit | None = None  # where wall_s went (timing.py)

    @property
    def failed_fraction(self) -> float:
        """generation_failed rows over the rows answered in this run (0 when none were)."""
        return self.errors.get("generation_failed", 0) / self.rows if self.rows else 0.0

    def failure(self, max_failed_fraction: float) -> str | None:
        """Why the job counts as failed (too many generation_failed rows), or None."""
        if self.failed_fraction <= max_failed_fraction:
            return None
        return (
            f"{self.errors['generation_failed']} of {self.rows} rows failed in generation "
            f"({self.failed_fraction:.0%}), more than output.max_failed_fraction={max_failed_fraction:g}; "
            "their error column says why, and a rerun (output.mode=resume) retries them"
        )

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items()))
        return [
            f"rows answered:   {self.rows} (skipped {self.skipped} already in the output; "
            f"retried {self.retried} that had failed)",
            f"errors:          {sum(self.errors.values())}" + (f" ({kinds})" if kinds else ""),
            f"output tokens:   {self.completion_tokens} ({self.completion_tokens / max(self.wall_s, 1e-9):.1f} tokens/s)",
            f"wall time:       {self.wall_s:.1f} s",
            *(self.timing.lines() if self.timing else []),
            f"output:          {self.output} ({self.files} new files)",
        ]


def check_resources(cfg: BatchJobConfig) -> None:
    need = cfg.compute.num_gpus_per_actor
    require_gpus(need, f"compute.num_gpus_per_actor={need:g}", "batch/configs/quickstart.yaml")


def actor_pool(cfg: BatchJobConfig) -> ActorPoolStrategy:
    """The answering actors; each runs compute.calls_per_actor calls at once on its one engine (its
    generate is thread-safe), so a call's tail of long answers never leaves the slots empty."""
    c = cfg.compute
    sizes = {"size": c.num_actors} if c.max_actors is None else {"min_size": c.num_actors, "max_size": c.max_actors}
    return ActorPoolStrategy(
        **sizes, max_concurrent_calls_per_actor=c.calls_per_actor, enable_true_multi_threading=c.calls_per_actor > 1
    )


def question_blocks(cfg: BatchJobConfig, files: InputFiles):
    """The questions (the answerers add the prompts, in their adapter's template), in blocks of exactly
    compute.batch_size rows (the last one fewer): one block is one engine call. Left to itself Ray Data
    merges small blocks until a call is full, so calls came a few rows over (each leaving a tiny extra call behind), and a whole
    2,000-row file could reach one actor as one task while the rest of the pool sat idle."""
    ds = ray.data.read_datasource(QuestionDatasource(files, cfg.input))
    return ds.repartition(target_num_rows_per_block=cfg.compute.batch_size, strict=True)


def build_dataset(
    cfg: BatchJobConfig, files: InputFiles, done_ids: pa.Array, engine_factory: Callable | None = None, clock=None
):
    """The lazy Dataset of answer rows (nothing runs until it is written); the actors report their
    engines' start-up and calls to `clock` (a JobClock) when given."""
    return question_blocks(cfg, files).map_batches(
        Answerer,
        batch_size=cfg.compute.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(cfg),
        num_gpus=cfg.compute.num_gpus_per_actor,
        num_cpus=cfg.compute.num_cpus_per_actor,
        fn_constructor_kwargs={
            "job": cfg.model_dump(mode="json"),
            "done_ids": ray.put(done_ids),
            "engine_factory": engine_factory,
            "clock": clock,
        },
    )


def with_absolute_paths(cfg: BatchJobConfig) -> BatchJobConfig:
    cfg = cfg.model_copy(deep=True)
    cfg.input.path, cfg.output.path = absolute(cfg.input.path), absolute(cfg.output.path)
    if cfg.adapter:
        cfg.adapter = absolute(cfg.adapter)
    if cfg.model is not None and cfg.model.source == "local":
        cfg.model.name = absolute(cfg.model.name)
    return cfg


def check_model(cfg: BatchJobConfig) -> None:
    """Fail on the driver, before Ray starts, when the adapter or the base model's tokenizer cannot be
    found (found, not loaded: the actors load it)."""
    from mistral_qa.adapters import is_remote, read_training_config, resolve_adapter
    from mistral_qa.config import ModelConfig
    from mistral_qa.model import locate_tokenizer

    model = cfg.model
    if cfg.adapter and not is_remote(cfg.adapter):  # remote adapters are fetched by the actors
        training = read_training_config(resolve_adapter(cfg.adapter)) or {}
        if model is None and "model" in training:
            model = ModelConfig.model_validate(training["model"])
    if model is not None:
        locate_tokenizer(model)


def run_batch(cfg: BatchJobConfig, engine_factory: Callable | None = None) -> Summary:
    """Answer every question of cfg.input not yet in cfg.output; returns the summary."""
    start, marks = time.perf_counter(), Marks()
    if not cfg.input.path or not cfg.output.path:
        raise PreflightError("set input.path and output.path (or --input / --output)")
    cfg = with_absolute_paths(cfg)
    files = list_inputs(cfg.input.path, cfg.input.format)  # input, output and model problems fail before Ray starts
    check_question_column(files, cfg.input)
    if engine_factory is None:
        check_model(cfg)
    check_output(cfg.output.path)
    retried = 0
    if cfg.output.mode == "resume" and cfg.output.retry_failed:
        retried = drop_failed_rows(cfg.output.path)
    done = prepare_output(cfg.output.path, cfg.output.mode)
    log.info("input: %d files; output: %d rows already there", len(files.paths), len(done))
    marks.mark("ray_start")
    start_ray()
    marks.mark("ray_started")
    check_resources(cfg)
    DataContext.get_current().max_errored_blocks = cfg.compute.max_errored_blocks
    sink = AnswerDatasink(cfg.output.path, cfg.output.rows_per_file)
    clock = JobClock.remote()
    try:
        dataset = build_dataset(cfg, files, done, engine_factory, clock)
        marks.mark("submitted")
        dataset.write_datasink(sink)
        marks.mark("end")
        timing = split(marks.times, read_clock(clock))
    finally:
        ray.kill(clock)
    log.info(timing.log_line())
    wall_s = time.perf_counter() - start
    return Summary(
        output=cfg.output.path, skipped=len(done), retried=retried, wall_s=wall_s, timing=timing, **sink.stats
    )
