"""Answer a file (or folder, or bucket) of questions with Ray Data and write Parquet.

    python -m batch --config batch/configs/quickstart.yaml --show 5            # the project's questions, CPU
    python -m batch --config batch/configs/quickstart.yaml --input questions.jsonl --output answers/
    python -m batch --config batch/configs/mistral7b.yaml --input s3://bucket/questions/ --output s3://bucket/answers/
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
        -- python -m batch --config batch/configs/mistral7b.yaml --input s3://... --output s3://...

Overrides are `section.key=value` (YAML values), e.g. generation.max_tokens=64 compute.num_actors=4.
Rerunning with the same output answers only the rows not already there (output.mode=resume), and
again the rows whose generation failed (output.retry_failed).
Exit status: 0 done; 2 bad config; 1 input, output, model or cluster unusable (found before answering);
3 more than output.max_failed_fraction of the rows failed in generation (the summary says which kinds).
"""

from __future__ import annotations

import argparse
import sys

from mistral_qa.configio import load_config
from mistral_qa.entry import print_config, prog, report, run_main

from .config import BatchJobConfig

FAILED_ROWS = 3  # exit status: more than output.max_failed_fraction of the rows failed in generation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("python -m batch"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML file under batch/configs/")
    parser.add_argument("--input", help="question file, folder or glob (local, s3://, gs://); sets input.path")
    parser.add_argument("--output", help="output folder for the Parquet answers; sets output.path")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print N rows of the output afterwards")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def load_job_config(args: argparse.Namespace) -> BatchJobConfig:
    cfg = load_config(BatchJobConfig, args.config, args.overrides)
    # Paths are set directly, not as YAML overrides: a glob such as *.jsonl is not valid YAML.
    if args.input:
        cfg.input.path = args.input
    if args.output:
        cfg.output.path = args.output
    return cfg


def show_rows(output: str, n: int, width: int = 100) -> None:
    from .output import read_answers

    for row in read_answers(output, n).to_pylist():
        status = row["error"] or row["finish_reason"]
        print(f"\n[{row['id']}] ({status}, {row['completion_tokens']} tokens)")
        print(f"  Q: {_clip(row['question'], width)}")
        print(f"  A: {_clip(row['answer'], width)}")


def _clip(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: answer(args), job_errors)


def job_errors() -> tuple[type[Exception], ...]:
    from mistral_qa.adapters import AdapterError  # these pull in torch and pyarrow: only once an error came
    from mistral_qa.model import ModelLoadError
    from mistral_qa.preflight import PreflightError

    from .io import InputError
    from .output import OutputError

    return InputError, OutputError, PreflightError, AdapterError, ModelLoadError


def answer(args: argparse.Namespace) -> int:
    cfg = load_job_config(args)
    if args.print_config:
        return print_config(cfg)
    from .pipeline import run_batch  # imports Ray: only once the config is valid

    summary = run_batch(cfg)
    print("\n".join(["", "batch summary", *summary.lines()]))
    if args.show:
        show_rows(cfg.output.path, args.show)
    failure = summary.failure(cfg.output.max_failed_fraction)
    return report(failure, FAILED_ROWS) if failure else 0


if __name__ == "__main__":
    sys.exit(main())
