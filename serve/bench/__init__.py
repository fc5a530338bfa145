"""Helpers of `python -m serve.benchmark`, one concern per module: workload (prompts, question files),
hf_baselines (plain transformers), engine_runs (the Engine in process), adapters (random LoRA
adapters and their cost), loadgen (streaming HTTP clients), serve_run (the Ray Serve app under load),
batch_run (the Ray Data batch job), gpu (memory readings), report (the table)."""
