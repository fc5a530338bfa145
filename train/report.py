"""What a run leaves for people: progress lines, metrics.jsonl and a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from pathlib import Path


def progress_line(step: int, max_steps: int, record: dict, started: float, first_step: int) -> str:
    done = step - first_step + 1
    elapsed = time.monotonic() - started
    eta = timedelta(seconds=int(elapsed / max(done, 1) * (max_steps - step)))
    return (
        f"step {step}/{max_steps} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
        f"{record['tokens_per_s']:.0f} tok/s ({record['nonpad_tokens_per_s']:.0f} non-pad) | eta {eta}"
    )


def write_metrics(history: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in history))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # e.g. a GPU image without it: the metrics file still holds every number
        logging.getLogger("train").warning("matplotlib is not installed: no %s", path.name)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        window = max(1, len(train) // 40)  # per-step losses of small batches are noisy: show a running mean too
        if window > 1:
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.6, label="train loss (per step)")
            means = [
                sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))
            ]
            ax.plot(steps, means, color="tab:blue", linewidth=1.5, label=f"train loss ({window}-step mean)")
        else:
            ax.plot(steps, losses, label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
