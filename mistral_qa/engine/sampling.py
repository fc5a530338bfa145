"""Choose each row's next token: greedy rows take the argmax (as `generate` does), sampled rows
draw from their own generator with their own temperature and top_p.

`choose` leaves the tokens on the device without waiting for them, so the runner can feed them to
the next decode step before it reads them; `next_tokens` reads them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .request import Request


def choose(logits: torch.Tensor, rows: Sequence[Request]) -> torch.Tensor:
    """logits: [rows, vocab] float32 for the last position of every row -> token ids [rows] (long),
    on the logits' device, not synchronised."""
    chosen = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row.params.temperature > 0:
            chosen[i] = sample(logits[i], row.params.temperature, row.params.top_p, row.generator)
    return chosen


def next_tokens(logits: torch.Tensor, rows: Sequence[Request]) -> list[int]:
    return choose(logits, rows).tolist()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token id drawn from softmax(logits / temperature) cut to its top_p head (a 0-d tensor)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[0]
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest head whose mass reaches top_p; the first token always stays.
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return order[choice[0]]
