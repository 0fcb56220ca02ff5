"""The token counts that the penalties read, for every penalized request at once: two device
tensors with a row (a slot) per request, so that a step brings all its rows up to date with
one scatter and reads them with one gather, whatever the batch (a tensor per request cost a
few kernel launches per row at every step, host time that decode steps wait for).

A request takes a slot at its first penalized step (its prompt is marked then) and gives it
back through `forget`; the tensors double when every slot is taken. The output counted is the
prompt's resumed tail (`num_resumed_tokens`), then the request's output tokens, `num_counted`
of them so far: each step adds only the tokens since.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .host_copy import to_device
from .sampling_params import SamplingParams

FIRST_SLOTS = 16


class TokenHistory(Protocol):
    prompt_token_ids: list[int]
    output_token_ids: list[int]


def output_since(p: SamplingParams, history: TokenHistory, start: int) -> list[int]:
    """The request's output from token `start` on; its output is the prompt's resumed tail,
    then this node's output tokens (built from `start` only: no copy of the whole history)."""
    k = p.num_resumed_tokens
    if start >= k:
        return history.output_token_ids[start - k:]
    prompt = history.prompt_token_ids
    return prompt[len(prompt) - k + start:] + history.output_token_ids


class PenaltyCounts:
    def __init__(self, device: torch.device):
        self.device = device
        self.slots: dict[str, int] = {}  # request_id -> its row
        self.num_counted: dict[str, int] = {}  # request_id -> output tokens in its row
        self.free: list[int] = []
        self.prompt_seen: torch.Tensor | None = None  # [slots, vocab] bool: in the prompt (repetition)
        self.output_counts: torch.Tensor | None = None  # [slots, vocab] float32: times in the output

    def forget(self, request_id: str) -> None:
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            del self.num_counted[request_id]
            self.free.append(slot)

    def gather(self, request_ids: list[str], params: list[SamplingParams], histories: list,
               vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_seen [rows, vocab], output_counts [rows, vocab]) of these requests, up to date
        with their histories; copies, which the caller may change."""
        slots, fresh, seen, counted = [], [], ([], []), ([], [])
        for request_id, p, history in zip(request_ids, params, histories):
            slot = self.slots.get(request_id)
            if slot is None:
                slot = self._take(request_id, vocab)
                fresh.append(slot)
                seen[0].extend([slot] * len(history.prompt_token_ids))
                seen[1].extend(history.prompt_token_ids)
            new = output_since(p, history, self.num_counted[request_id])
            self.num_counted[request_id] += len(new)
            counted[0].extend([slot] * len(new))
            counted[1].extend(new)
            slots.append(slot)
        if fresh:  # a slot keeps what its last request left
            index = to_device(fresh, torch.int64, self.device)
            self.prompt_seen.index_fill_(0, index, False)
            self.output_counts.index_fill_(0, index, 0.0)
        if seen[0]:
            self.prompt_seen[tuple(to_device(list(seen), torch.int64, self.device))] = True
        if counted[0]:
            self.output_counts.index_put_(tuple(to_device(list(counted), torch.int64, self.device)),
                                          torch.ones((), device=self.device), accumulate=True)
        index = to_device(slots, torch.int64, self.device)
        return self.prompt_seen.index_select(0, index), self.output_counts.index_select(0, index)

    def _take(self, request_id: str, vocab: int) -> int:
        if not self.free:
            self._grow(vocab)
        slot = self.free.pop()
        self.slots[request_id], self.num_counted[request_id] = slot, 0
        return slot

    def _grow(self, vocab: int) -> None:
        old = 0 if self.output_counts is None else len(self.output_counts)
        size = max(FIRST_SLOTS, 2 * old)
        seen = torch.zeros(size, vocab, dtype=torch.bool, device=self.device)
        counts = torch.zeros(size, vocab, dtype=torch.float32, device=self.device)
        if old:
            seen[:old], counts[:old] = self.prompt_seen, self.output_counts
        self.prompt_seen, self.output_counts = seen, counts
        self.free.extend(range(size - 1, old - 1, -1))
