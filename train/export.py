"""Merge a trained LoRA adapter into its base: a plain model folder for transformers, vLLM or TGI.

    python -m train.export --adapter outputs/quickstart/adapter --out outputs/quickstart/merged
    python -m train.export --adapter outputs/mistral7b-alpaca/adapter --out merged --push-to-hub me/mistral-qa

The base is read from the adapter's training_config.yaml. The folder holds safetensors shards,
config.json, generation_config.json, the tokenizer and mistral_qa_export.json (where it came from);
`AutoModelForCausalLM.from_pretrained(folder)` loads it. --push-to-hub uploads it with the token in
HF_TOKEN or the file named by HF_TOKEN_FILE (private by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mistral_qa.adapters import AdapterError
from mistral_qa.entry import prog, run_main
from mistral_qa.model import ModelLoadError

from .merge import DTYPES, ExportError, check_hub_token, export_merged, push_to_hub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("python -m train.export"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="outputs/<run>/adapter, a checkpoint folder, or s3:// / gs://")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (must be empty or absent)")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="weights' dtype (default float16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload to this hub repo (user/name)")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: create the repo public")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: export(args), lambda: (ExportError, AdapterError, ModelLoadError))


def export(args: argparse.Namespace) -> int:
    if args.push_to_hub:
        check_hub_token()  # before the merge, which takes minutes for a 7B model
    out = export_merged(
        args.adapter, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )
    print(f"merged model: {out}")
    if args.push_to_hub:
        print(f"pushed:       {push_to_hub(out, args.push_to_hub, private=not args.public)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
