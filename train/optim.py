"""Optimiser and learning-rate schedule from OptimizerConfig."""

from __future__ import annotations

import importlib
import logging
import math
import warnings

import torch

from mistral_qa.configio import ConfigError

from .config import OptimizerConfig

log = logging.getLogger(__name__)


# Optimisers whose package is not in the core install: (package, the extra that installs it).
NEEDS_EXTRA = {"paged_adamw_32bit": ("bitsandbytes", "qlora")}


def check_optimizer(cfg: OptimizerConfig) -> None:
    """Refuse optim.name when this install lacks its package: one line naming the setting and the
    extra, instead of an ImportError traceback in every Ray Train worker (and each restart)."""
    if cfg.name not in NEEDS_EXTRA:
        return
    package, extra = NEEDS_EXTRA[cfg.name]
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise ConfigError(
            f"optim.name={cfg.name} needs {package}, which this install lacks ({err}): "
            f"pip install 'mistral-qa[{extra}]', or set optim.name=adamw_torch"
        ) from None


def build_optimizer(cfg: OptimizerConfig, params: list[torch.nn.Parameter], on_cuda: bool) -> torch.optim.Optimizer:
    if cfg.name == "adamw_torch":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    check_optimizer(cfg)
    import bitsandbytes as bnb

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = bnb.optim.PagedAdamW32bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    for w in caught:
        log.warning("bitsandbytes: %s", w.message)
    if not on_cuda:
        # bitsandbytes pages optimiser state through CUDA unified memory; on CPU it runs the same
        # AdamW 32-bit update without paging. Say so rather than hide it.
        log.warning("paged_adamw_32bit on CPU: bitsandbytes uses its non-paged 32-bit AdamW (no CUDA paging)")
    return optimizer


def lr_lambda(cfg: OptimizerConfig, max_steps: int):
    """Multiplier of the peak lr at a 0-based scheduler step: linear warmup, then the decay."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def build_scheduler(cfg: OptimizerConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
