"""Fine-tune a LoRA adapter with Ray Train.

    python -m train --config train/configs/quickstart.yaml                      # CPU, a few minutes
    python -m train --config train/configs/quickstart.yaml scaling.num_workers=2
    python -m train --config train/configs/mistral7b_alpaca.yaml                # the reference run (GPUs)
    python -m train --config train/configs/quickstart.yaml --print-config       # show the resolved config

Overrides are `section.key=value` (YAML values). Re-running the same run.name resumes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mistral_qa.configio import load_config
from mistral_qa.data import DataSourceError
from mistral_qa.entry import print_config, prog, run_main
from mistral_qa.model import ModelLoadError
from mistral_qa.preflight import PreflightError

from .config import TrainJobConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("python -m train"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML file under train/configs/")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--ask", type=int, default=0, metavar="N", help="after training, answer N questions of the demo set"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: train(args), job_errors)


def job_errors() -> tuple[type[Exception], ...]:
    return ModelLoadError, DataSourceError, PreflightError


def train(args: argparse.Namespace) -> int:
    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    if args.print_config:
        return print_config(cfg)
    from .launch import run_training  # imports Ray: only once the config is valid

    out = run_training(cfg)
    print(f"adapter:    {out / 'adapter'}")
    print(f"metrics:    {out / 'metrics.jsonl'}")
    print(f"loss curve: {out / 'loss_curve.png'}")
    if args.ask:
        ask(out / "adapter", args.ask)
    return 0


def ask(adapter: Path, n: int) -> None:
    """Answer the first n questions of the project's question set with the fine-tuned adapter (greedy)."""
    import json

    from mistral_qa.adapters import adapter_templates
    from mistral_qa.data import QUESTIONS
    from mistral_qa.engine import Engine, EngineConfig, SamplingParams
    from mistral_qa.templates import instruction_prompt

    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines()[:n]]
    engine = Engine(EngineConfig(adapters={"tuned": str(adapter)}, device="cpu"))
    try:
        template = adapter_templates(engine.cfg.adapters, engine.tokenizer)["tuned"]  # the one it trained with
        prompts = [instruction_prompt(template, q) for q in questions]
        answers = engine.generate(prompts, SamplingParams(max_tokens=160), adapter="tuned", template_stop=template.stop)
    finally:
        engine.close()
    for question, answer in zip(questions, answers):
        print(f"\nQ: {question}\nA: {answer.text.strip()}")


if __name__ == "__main__":
    sys.exit(main())
