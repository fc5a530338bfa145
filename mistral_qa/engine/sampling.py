"""Choose each row's next token: greedy rows take the argmax (as `generate` does), sampled rows
draw from their own generator with their own temperature, top_k and top_p.

Before choosing, a row's logits get its presence/frequency penalties (OpenAI's definition, over the
tokens of this answer: logit -= presence * (count > 0) + frequency * count; greedy rows too) and its
grammar's mask; its logprobs are read from those logits (before temperature). Every adjustment is
per row, so a row gets the same numbers whatever it is batched with; a batch where no row asks for
any of them takes the plain path (one argmax), as cheap as before they existed.

`choose` leaves everything on the device without waiting for it, so the runner can feed the tokens
to the next decode step before it reads them (`Choice.read`); on CUDA it queues their copies to the
host at once, so reading them later waits for their own step, not for the next one launched
meanwhile. Penalty counts stay on the device too; only grammar masks need the host (the runner does
not run ahead of grammar rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .request import Request

# A row's logprob reading on the device: (chosen token's logprob, top logprobs, top token ids).
_Logprobs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# ...and on the host: (logprob, [(token id, logprob), ...] likeliest first).
HostLogprobs = tuple[float, list[tuple[int, float]]]


@dataclass
class Choice:
    tokens: torch.Tensor  # [rows] long, on the logits' device
    logprobs: dict[int, _Logprobs] = field(default_factory=dict)  # row index -> its reading
    _host: list[torch.Tensor] | None = None  # CUDA: the tensors above, copied into pinned host memory
    _copied: torch.cuda.Event | None = None  # recorded on the stream after those copies

    def send_to_host(self) -> None:
        """CUDA: queue the copies of the tokens (and logprobs) to the host now, behind the work that
        computes them, so that `read` waits for this step only. A plain read (`tolist`) would queue its
        copy at the time of reading, behind whatever was launched since: the runner launches the next
        decode step before it reads this one, and would wait for that step too."""
        if self.tokens.device.type != "cuda":
            return
        tensors = [self.tokens, *(t for reading in self.logprobs.values() for t in reading)]
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, device in zip(self._host, tensors, strict=True):
            host.copy_(device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def read(self) -> list[tuple[int, HostLogprobs | None]]:
        """(token, logprobs or None) per row, on the host (waits for the device)."""
        tokens, readings = self.tokens, list(self.logprobs.values())
        if self._copied is not None:
            self._copied.synchronize()  # the step's own copies, not what was launched after them
            tokens, *flat = self._host
            readings = [tuple(flat[k : k + 3]) for k in range(0, len(flat), 3)]
        tokens = tokens.tolist()
        out: list[tuple[int, HostLogprobs | None]] = [(t, None) for t in tokens]
        for i, (chosen, values, ids) in zip(self.logprobs, readings, strict=True):
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
            out[i] = (tokens[i], (chosen.item(), top))
        return out


def _adjusted(row: Request) -> bool:
    p = row.params
    return bool(p.presence_penalty or p.frequency_penalty or p.logprobs or row.grammar is not None)


def choose(logits: torch.Tensor, rows: Sequence[Request]) -> Choice:
    """logits: [rows, vocab] float32 for the last position of every row (changed in place where a
    row has penalties or a grammar) -> the rows' tokens, on the device, not synchronised."""
    adjusted = [i for i, row in enumerate(rows) if _adjusted(row)]
    for i in adjusted:
        penalise(logits[i], rows[i])
        if rows[i].grammar is not None:
            rows[i].grammar.mask(logits[i])
    chosen = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        p = row.params
        if p.temperature > 0:
            chosen[i] = sample(logits[i], p.temperature, p.top_p, p.top_k, row.generator)
    choice = Choice(chosen)
    for i in adjusted:
        row = rows[i]
        if row.params.logprobs:
            choice.logprobs[i] = _read_logprobs(logits[i], chosen[i], row.params.top_logprobs)
        if row.counts is not None:
            row.counts.index_add_(0, chosen[i : i + 1], torch.ones(1, device=logits.device))
    choice.send_to_host()
    return choice


def next_tokens(logits: torch.Tensor, rows: Sequence[Request]) -> list[tuple[int, HostLogprobs | None]]:
    return choose(logits, rows).read()


def penalise(logits: torch.Tensor, row: Request) -> None:
    """Presence and frequency penalties over the tokens generated so far (row.counts, on the device)."""
    p = row.params
    if not (p.presence_penalty or p.frequency_penalty):
        return
    if row.counts is None:
        row.counts = torch.zeros(logits.shape[-1], device=logits.device)
    logits -= p.presence_penalty * (row.counts > 0) + p.frequency_penalty * row.counts


def _read_logprobs(logits: torch.Tensor, token: torch.Tensor, top: int) -> _Logprobs:
    logprobs = torch.log_softmax(logits, dim=-1)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], token.new_zeros(0))
    return logprobs[token], values, ids


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id drawn from softmax(logits / temperature), cut to its top_k likeliest tokens (when
    top_k > 0) and then to its top_p head (a 0-d tensor)."""
    if 0 < top_k < logits.shape[-1]:
        values, ids = logits.topk(top_k)
        logits = torch.full_like(logits, float("-inf")).scatter_(0, ids, values)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[0]
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest head whose mass reaches top_p; the first token always stays.
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return order[choice[0]]
