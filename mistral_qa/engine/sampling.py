"""Choose each row's next token: greedy rows take the argmax (as `generate` does), sampled rows
draw from their own generator with their own temperature and top_p."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .request import Request


def next_tokens(logits: torch.Tensor, rows: Sequence[Request]) -> list[int]:
    """logits: [rows, vocab] float32 for the last position of every row."""
    chosen = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.params.temperature > 0:
            chosen[i] = sample(logits[i], row.params.temperature, row.params.top_p, row.generator)
    return chosen


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest head whose mass reaches top_p; the first token always stays.
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return int(order[choice])
