"""One benchmark run, one card, one table: plain transformers baselines, the engine in process, the
engine behind the real Ray Serve HTTP endpoint under concurrent streaming clients, LoRA adapter costs,
and the real Ray Data batch job, all on the same random-weight model.

    python -m benchmarks.serving --json-out results.json --md-out results.md            # Mistral-7B shape, GPU
    python -m benchmarks.serving --phases engine,serve --concurrency 32 --requests 128
    python -m benchmarks.serving --phases serve --serve-ramp-s 5                        # spread starts over 5 s
    python -m benchmarks.serving --model-name tiny-mistral --device cpu --concurrency 4 --requests 8 \
        --max-tokens 16 --hf-new-tokens 8 --batch-questions 40 --batch-gpus 0         # a CPU smoke run
    python -m benchmarks.serving --phases batch --batch-questions 4000 --batch-max-tokens 256 \
        --batch-compile-cache /shared/compile-cache                    # issue 18's job, cold then warm cache

The serve phase times its load twice on one deployment, --requests requests each: "burst", all
--concurrency clients starting together (every request runs to --max-tokens, so they also finish and
re-send together: the engine sees waves of C new prompts, and TTFT is the prefill of a whole wave),
and "staggered", client k of C starting k * --serve-ramp-s / C later (closer to real traffic). A ramp
about as long as one request spreads arrivals evenly over the decode cycle; --serve-ramp-s 0 skips
the staggered run.

The engine phase also times --max-batch-size requests submitted at once in process, with the
engine's own step-loop figures (ms and rows per decode step; seconds launching, waiting for the
GPU, streaming text, prefilling), and profiles the engine's GPU work alone (--profile-steps,
benchmarks/engine_profile.py): a decode step at 1 and at --max-batch-size sequences and one
prefill pack, by kernel category, with optional chrome traces (--profile-trace-dir).

Phases run in this order: engine, adapters, serve, batch, hf (the baselines last: they are the
slowest and least important figures); the table lists them as hf, engine, serve, adapters, batch.
Each phase frees its GPU memory before the next, prints progress as it goes, and the JSON is
rewritten after every phase, so a cut-off run still leaves its figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import gpu
from .serving_report import render, table_rows, write_outputs

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("engine", "adapters", "service", "serve", "batch", "hf")  # the order they run in
DEFAULT_ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def slots_setting(value: str) -> int | str:
    """engine.max_batch_size on the command line: auto, or a positive count."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give auto or a positive count")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    p.add_argument(
        "--model-name",
        default="mistral-7b",
        choices=["mistral-7b", "tiny-mistral"],
        help="random-weight shape (model.source=random, real Mistral tokenizer)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--max-batch-size", type=int, default=64, help="engine.max_batch_size everywhere")
    p.add_argument("--max-context", type=int, default=1024, help="engine.max_context everywhere")
    p.add_argument("--prefill-tokens", type=int, default=1024, help="engine.prefill_tokens everywhere")
    p.add_argument(
        "--decode-attention",
        default="auto",
        choices=["auto", "sdpa", "flex"],
        help="engine.decode_attention everywhere",
    )
    p.add_argument("--prompt-tokens", type=int, default=256, help="length of each distinct prompt (tokens)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per request (engine, serve, adapters)")
    p.add_argument("--distinct-prompts", type=int, default=16, help="distinct prompts, reused across requests")
    p.add_argument("--single-repeats", type=int, default=3, help="timed single-stream runs (median reported)")
    p.add_argument(
        "--profile-steps", type=int, default=20, help="engine phase: profile this many decode steps / prefills (0: off)"
    )
    p.add_argument("--profile-trace-dir", type=Path, default=None, help="engine phase: write chrome traces here")
    p.add_argument("--hf-new-tokens", type=int, default=64, help="new tokens per HF baseline request")
    p.add_argument("--hf-batch", type=int, default=32, help="batch of the HF model.generate baseline")
    p.add_argument("--hf-cb-requests", type=int, default=64, help="requests for HF generate_batch (0: skip)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the benchmark's Serve app")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop HTTP clients")
    p.add_argument("--requests", type=int, default=256, help="HTTP requests in each timed load (burst, staggered)")
    p.add_argument(
        "--serve-ramp-s",
        type=float,
        default=2.0,
        help="seconds over which the staggered run's clients start (~ one request's duration spreads arrivals "
        "evenly over the decode cycle; 0: no staggered run)",
    )
    p.add_argument("--serve-warmup", type=int, default=None, help="warm-up HTTP requests (default: --concurrency)")
    p.add_argument("--adapter-batch", type=int, default=32, help="requests per batch in the adapter phase")
    p.add_argument("--adapter-repeats", type=int, default=3, help="timed runs per adapter batch (median reported)")
    p.add_argument(
        "--alpaca", type=Path, default=DEFAULT_ALPACA, help="Alpaca JSON whose instructions feed the batch job"
    )
    p.add_argument(
        "--batch-questions", type=int, default=2000, help="questions for the batch job (issue 18's job: 4000)"
    )
    p.add_argument("--batch-max-tokens", type=int, default=256, help="generation.max_tokens of the batch job")
    p.add_argument("--batch-gpus", type=float, default=1, help="compute.num_gpus_per_actor (0: CPU actors)")
    p.add_argument(
        "--stream-interval-ms", type=float, default=40, help="Serve's stream_interval_ms (0: a message per token)"
    )
    p.add_argument(
        "--batch-max-batch-size",
        type=slots_setting,
        default="auto",
        help="the batch job's engine.max_batch_size: a count, or auto (as many as the card holds, up to 512)",
    )
    p.add_argument(
        "--batch-call-rows", type=int, default=None, help="the batch job's compute.batch_size (default: the config's)"
    )
    p.add_argument(
        "--batch-calls-per-actor",
        type=int,
        default=None,
        help="the batch job's compute.calls_per_actor (default: the config's)",
    )
    p.add_argument("--batch-actors", default="auto", help="comma-separated actor counts; auto: 1, and 2 with 2+ GPUs")
    p.add_argument(
        "--batch-config",
        type=Path,
        default=None,
        help="batch YAML (default: batch/configs/mistral7b.yaml, or tiny.yaml for tiny-mistral)",
    )
    p.add_argument("--batch-timeout", type=float, default=1800, help="seconds one batch job may take")
    p.add_argument(
        "--batch-compile-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="run each batch job twice on this engine.compile_cache folder (first, then warm), each run with "
        "empty local Inductor/Triton caches, and report both runs' time split and engine ready",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, help="adapters, questions, answers, logs (default: a temp dir)"
    )
    p.add_argument("--json-out", type=Path, default=None, help="write the results (and the table) as JSON")
    p.add_argument("--md-out", type=Path, default=None, help="write the table as markdown")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        p.error(f"--phases: unknown {unknown}; choose from {','.join(PHASES)}")
    if args.serve_ramp_s < 0:
        p.error("--serve-ramp-s must be >= 0")
    if args.serve_warmup is None:
        args.serve_warmup = args.concurrency
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    """The run's shared state: model config, prompts, Ray (started on first need), the report."""

    def __init__(self, args: argparse.Namespace, work: Path):
        from mistral_qa.config import ModelConfig
        from mistral_qa.model import load_tokenizer

        from .workload import bench_prompts, token_counter

        self.args, self.work = args, work
        self.model_cfg = ModelConfig(source="random", name=args.model_name)
        self.tokenizer = load_tokenizer(self.model_cfg)
        self.prompts = bench_prompts(token_counter(self.tokenizer), args.distinct_prompts, args.prompt_tokens)
        self.cuda = args.device != "cpu" and gpu.cuda_available()
        self.ray_started = False
        self.report = {"meta": self._meta(), "phases": {}}

    def _meta(self) -> dict:
        a = self.args
        return {
            "model": f"random {a.model_name} (model.source=random, real Mistral tokenizer)",
            **gpu.device_info(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "engine": self.engine_settings(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        }

    def engine_settings(self) -> dict:
        a = self.args
        return {
            "device": a.device,
            "dtype": a.dtype,
            "max_batch_size": a.max_batch_size,
            "max_context": a.max_context,
            "prefill_tokens": a.prefill_tokens,
            "decode_attention": a.decode_attention,
        }

    def engine_config(self):
        from mistral_qa.engine import EngineConfig

        return EngineConfig(model=self.model_cfg, **self.engine_settings())

    def ray_address(self) -> str:
        import ray

        if not ray.is_initialized():
            pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            env = {"PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}
            if os.environ.get("MISTRAL_QA_CACHE"):
                env["MISTRAL_QA_CACHE"] = os.environ["MISTRAL_QA_CACHE"]
            # address="local": a fresh instance of our own, never a cluster someone else runs on this machine.
            ray.init(
                address="local",
                num_cpus=max(4, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env},
            )
            self.ray_started = True
        return ray.get_runtime_context().gcs_address

    def close(self) -> None:
        if self.ray_started:
            import ray

            ray.shutdown()
            self.ray_started = False


def phase_engine(b: Bench) -> dict:
    from mistral_qa.engine import Engine

    from .engine_profile import profile_engine
    from .engine_runs import full_batch, single_stream
    from .profiling import format_summary

    a = b.args
    with gpu.TorchPeak() as peak:
        start = time.perf_counter()
        engine = Engine(b.engine_config())
        load_s = time.perf_counter() - start
        try:
            single = single_stream(engine, b.prompts[0].prompt, a.max_tokens, a.single_repeats)
            full = full_batch(engine, [p.prompt for p in b.prompts], a.max_batch_size, a.max_tokens)
            log(f"engine, {a.max_batch_size} requests at once: {full['tok_s']:.1f} tok/s")
            profile = {}
            if a.profile_steps:
                context = min(a.prompt_tokens + a.max_tokens, a.max_context)
                rows = sorted({1, a.max_batch_size})
                profile = profile_engine(
                    engine, b.prompts[0].prompt, rows, context, a.profile_steps, a.profile_trace_dir
                )
                for name, summary in profile.items():
                    log(f"engine profile, {name}:\n{format_summary(summary)}")
        finally:
            engine.close()
            del engine
        return {
            "single": single,
            "full_batch": full,
            "profile": profile,
            "load_s": load_s,
            "peak_gpu_gib": peak.read(),
            "peak_note": "torch max_memory_allocated (weights + KV cache slots)",
        }


def phase_adapters(b: Bench) -> dict:
    from .adapter_costs import run_adapter_costs

    a = b.args
    with gpu.TorchPeak() as peak:
        result = run_adapter_costs(
            b.engine_config(),
            [p.prompt for p in b.prompts],
            a.adapter_batch,
            a.max_tokens,
            a.adapter_repeats,
            b.work / "adapters",
            log,
        )
        return {**result, "peak_gpu_gib": peak.read(), "peak_note": "torch, the largest of the three engines"}


def serve_app_args(b: Bench) -> dict:
    a = b.args
    return {
        "engine": {"model": b.model_cfg.model_dump(), **b.engine_settings()},
        "default_max_tokens": a.max_tokens,
        "max_pending": max(64, 2 * a.concurrency),
        "stream_interval_ms": a.stream_interval_ms,
    }


def phase_service(b: Bench) -> dict:
    from .service_load import run_service_load

    a = b.args
    with gpu.TorchPeak() as peak:
        result = run_service_load(
            b.engine_config(), serve_app_args(b), b.prompts, a.requests, a.concurrency, a.max_tokens, log
        )
    return {**result, "peak_gpu_gib": peak.read(), "peak_note": "torch max_memory_allocated"}


def phase_serve(b: Bench) -> dict:
    from . import serve_run

    a = b.args
    b.ray_address()
    app_args = serve_app_args(b)
    with gpu.SmiPeak() as peak:
        try:
            url = serve_run.deploy(app_args, a.port, a.concurrency, num_gpus=1 if b.cuda else 0)
            log(f"serve: app up at {url}")
            result = serve_run.run_serve_load(
                url,
                b.prompts,
                a.requests,
                a.concurrency,
                a.max_tokens,
                a.serve_warmup,
                log,
                a.serve_ramp_s,
                serve_run.replica_stats,
            )
        finally:
            serve_run.shutdown()
    return {**result, "peak_gpu_gib": peak.read(), "peak_note": "whole card incl. this process's CUDA context"}


def batch_actor_counts(b: Bench) -> list[int]:
    a = b.args
    if a.batch_actors != "auto":
        return [int(x) for x in a.batch_actors.split(",")]
    gpus = gpu.device_info()["gpus"] if b.cuda else 0
    return [1, 2] if a.batch_gpus > 0 and gpus >= 2 * a.batch_gpus else [1]


def phase_batch(b: Bench) -> dict:
    from .batch_job import job_overrides, job_runs, split_line
    from .workload import write_alpaca_questions

    a = b.args
    questions = b.work / "questions.jsonl"
    write_alpaca_questions(a.alpaca, a.batch_questions, questions)
    config = a.batch_config or ROOT / "batch" / "configs" / (
        "tiny.yaml" if a.model_name == "tiny-mistral" else "mistral7b.yaml"
    )
    address = b.ray_address()
    runs = []
    with gpu.SmiPeak() as peak:
        for actors in batch_actor_counts(b):
            engine = {**b.engine_settings(), "max_batch_size": a.batch_max_batch_size}
            overrides = job_overrides(
                a.model_name,
                actors,
                a.batch_gpus,
                engine,
                a.batch_max_tokens,
                a.batch_call_rows,
                a.batch_calls_per_actor,
            )
            log(f"batch: {actors} actor(s), {a.batch_questions} questions ...")
            cache = a.batch_compile_cache
            for run in job_runs(config, questions, b.work, str(actors), overrides, address, a.batch_timeout, cache):
                gpus_used = actors * a.batch_gpus
                run.update(actors=actors, gpus_per_actor=a.batch_gpus, tok_s=run["output_tokens"] / run["job_wall_s"])
                run["tok_s_per_gpu"] = run["tok_s"] / gpus_used if gpus_used else None
                runs.append(run)
                who = f"{actors} actor(s)" + (f", {run['label']}" if run["label"] else "")
                log(f"batch: {who}: {run['tok_s']:.1f} tok/s, {run['rows_written']} rows, {run['job_wall_s']:.1f} s")
                log(f"batch: {who}: {split_line(run['time_split'])}")
    return {
        "questions": a.batch_questions,
        "runs": runs,
        "peak_gpu_gib": peak.read(),
        "peak_note": "whole card, all runs of this phase",
    }


def phase_hf(b: Bench) -> dict:
    import torch

    from .baselines.hf_generate import run_hf_baselines

    a = b.args
    device = torch.device("cuda" if b.cuda else "cpu")
    with gpu.TorchPeak() as peak:
        result = run_hf_baselines(
            b.model_cfg,
            b.tokenizer,
            [p.prompt for p in b.prompts],
            device,
            a.dtype,
            a.hf_new_tokens,
            a.hf_batch,
            a.hf_cb_requests,
            log,
        )
        return {**result, "peak_gpu_gib": peak.read(), "peak_note": "torch max_memory_allocated"}


RUNNERS = {
    "engine": phase_engine,
    "adapters": phase_adapters,
    "service": phase_service,
    "serve": phase_serve,
    "batch": phase_batch,
    "hf": phase_hf,
}


def run_phase(b: Bench, name: str) -> bool:
    log(f"phase {name}: start")
    start = time.perf_counter()
    try:
        result = RUNNERS[name](b)
        ok = True
    except Exception as err:  # one failed phase must not lose the others' figures
        traceback.print_exc()
        result, ok = {"error": f"{type(err).__name__}: {err}"}, False
    gpu.free_memory()
    result["phase_s"] = time.perf_counter() - start
    b.report["phases"][name] = result
    write_outputs(b.report, b.args.json_out, b.args.md_out)
    log(f"phase {name}: {'done' if ok else 'FAILED'} in {result['phase_s']:.1f} s")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mistral-qa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    log(f"benchmark of {bench.report['meta']['model']} on {bench.report['meta']['gpu_name'] or 'CPU'}; work dir {work}")
    failed = []
    try:
        for name in PHASES:
            if name in args.phases:
                if not run_phase(bench, name):
                    failed.append(name)
            if name == "batch":
                bench.close()  # Ray is done with: the HF baselines run alone
    finally:
        bench.close()
    bench.report["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_outputs(bench.report, args.json_out, args.md_out)
    print("\n" + render(table_rows(bench.report["phases"]), markdown=False), flush=True)
    if failed:
        print(f"\nfailed phases: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
