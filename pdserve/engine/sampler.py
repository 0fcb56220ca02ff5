"""Batched sampling: greedy, temperature, top-k, top-p, min-p, with per-request seeds.

A seeded request draws from its own generator, created at its first sample, so its tokens
depend only on its seed and its own history, never on what it was batched with. A request
that arrives with tokens already sampled elsewhere (a decode node continuing after the
prefill node's first token) advances its new generator past those draws, so a seeded
request gives the same tokens disaggregated as in one engine.
"""

from __future__ import annotations

import torch

from .host_copy import to_device
from .sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.default_generator = torch.Generator(device=device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}  # request_id -> its seeded generator

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
                 num_sampled: list[int] | None = None) -> torch.Tensor:
        """logits [num_rows, vocab_size] -> sampled token ids [num_rows]. `num_sampled[i]`: how
        many tokens row i's request has sampled before (0 if not given)."""
        out = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return out
        row_params = [params[i] for i in rows]
        index = to_device(rows, torch.int64, self.device)
        probs = filtered_probs(logits.index_select(0, index).float(), row_params)
        noise = torch.empty_like(probs)
        for j, (i, p) in enumerate(zip(rows, row_params)):
            skip = num_sampled[i] if num_sampled else 0
            noise[j].exponential_(generator=self._generator(request_ids[i], p, skip, vocab=noise.shape[1]))
        # the exponential race: a draw from probs
        out.index_copy_(0, index, (probs / noise).argmax(dim=-1))
        return out

    def _generator(self, request_id: str, params: SamplingParams, skip: int, vocab: int) -> torch.Generator:
        if params.seed is None:
            return self.default_generator
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed % 2**64)
            for _ in range(skip):  # the draws of the tokens sampled before (one row each)
                torch.empty(vocab, device=self.device).exponential_(generator=gen)
            self.generators[request_id] = gen
        return gen


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k and top-p on the sorted logits, then min-p; returns probs."""
    device = logits.device
    temperature = to_device([p.temperature for p in params], torch.float32, device)
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) < vocab or min(top_p) < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        drop = ranks >= to_device(top_k, torch.int64, device)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first stays)
        above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = above >= to_device(top_p, torch.float32, device)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):  # decided on the host: no device sync
        min_p = to_device([p.min_p for p in params], torch.float32, device)
        drop = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
