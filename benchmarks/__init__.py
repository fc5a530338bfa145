"""Benchmarks: speed and memory of the jobs, kept apart from the code the jobs run (they sit above
train/, serve/, batch/ and mistral_qa/ and may import any of them; nothing there imports them).
Not installed with the package: run them from the checkout's root.

    python -m benchmarks.train_step --help    # the training step against transformers' Trainer
    python -m benchmarks.scaling --help       # one training job at 1, 2, 4, ... workers
    python -m benchmarks.serving --help       # HF generate, the engine, Ray Serve, LoRA adapters, the batch job

One concern per module. Training: train_step (the run), train_report (its timings and table),
agreement (per-token losses against HF's forward), scaling. Serving: serving (the run), workload
(prompts, question files), engine_runs (the Engine in process), engine_profile, adapter_costs
(random LoRA adapters and their cost), loadgen (streaming HTTP clients), serve_run (the Ray Serve app
under load), batch_job (the Ray Data batch job), gpu (memory readings), serving_report (the table).
Both: profiling (torch.profiler summaries); baselines/ (plain transformers: hf_trainer, hf_generate).
"""
