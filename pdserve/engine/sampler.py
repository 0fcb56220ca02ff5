"""Batched sampling: logits processors, then greedy, temperature, top-k, top-p, min-p, with
per-request seeds; the log probabilities a request asks for come from the raw logits.

A seeded request draws from its own generator, created at its first sample, so its tokens
depend only on its seed and its own history, never on what it was batched with. A request
that arrives with tokens already sampled elsewhere (a decode node continuing after the
prefill node's first token) advances its new generator past those draws, so a seeded
request gives the same tokens disaggregated as in one engine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .host_copy import to_device
from .logits_processors import LogitsProcessors, TokenHistory
from .request import TokenLogprobs
from .sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, eos_token_ids: tuple[int, ...] = ()):
        self.device = device
        self.default_generator = torch.Generator(device=device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}  # request_id -> its seeded generator
        self.processors = LogitsProcessors(device, eos_token_ids)

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.processors.forget(request_id)

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
                 num_sampled: list[int] | None = None,
                 histories: list[TokenHistory] | None = None,
                 pending_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logits [num_rows, vocab_size] -> sampled token ids [num_rows]. `num_sampled[i]`: how
        many tokens row i's request has sampled on this node before (0 if not given);
        `histories[i]`: its prompt and output tokens, needed where its params process logits;
        `pending_token_ids` [num_rows] (a step launched behind another): each row's latest
        token, which its history does not hold yet."""
        num_sampled = num_sampled or [0] * len(params)
        logits = self._processed(logits, request_ids, params, num_sampled, histories, pending_token_ids)
        out = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return out
        row_params = [params[i] for i in rows]
        index = to_device(rows, torch.int64, self.device)
        probs = filtered_probs(logits.index_select(0, index).float(), row_params)
        noise = torch.empty_like(probs)
        seeded = [(j, i, p) for j, (i, p) in enumerate(zip(rows, row_params)) if p.seed is not None]
        if len(seeded) < len(rows):  # the unseeded rows' draws in one launch (seeded ones: redrawn)
            noise.exponential_(generator=self.default_generator)
        for j, i, p in seeded:  # each from its own generator: its tokens depend on its seed alone
            skip = num_sampled[i] + p.num_resumed_tokens
            noise[j].exponential_(generator=self._generator(request_ids[i], p, skip, vocab=noise.shape[1]))
        # the exponential race: a draw from probs
        out.index_copy_(0, index, (probs / noise).argmax(dim=-1))
        return out

    def _processed(self, logits, request_ids, params, num_sampled, histories, pending_token_ids) -> torch.Tensor:
        """The logits after each request's processors (a float32 copy where any applies)."""
        rows = [i for i, p in enumerate(params) if p.processes_logits]
        if not rows:
            return logits
        if histories is None:
            raise ValueError("the sampler needs the token histories of requests that process logits")
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        index = to_device(rows, torch.int64, self.device)
        pending = None if pending_token_ids is None else pending_token_ids.index_select(0, index)
        sub = self.processors(logits.index_select(0, index).float(), pick(request_ids), pick(params),
                              pick(num_sampled), pick(histories), pending)
        return logits.to(torch.float32, copy=True).index_copy_(0, index, sub)  # raw logits stay (logprobs)

    def _generator(self, request_id: str, params: SamplingParams, skip: int, vocab: int) -> torch.Generator:
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed % 2**64)
            for _ in range(skip):  # the draws of the tokens sampled before (one row each)
                torch.empty(vocab, device=self.device).exponential_(generator=gen)
            self.generators[request_id] = gen
        return gen


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k and top-p on the sorted logits (top-k alone: against its k-th
    value, no sort), then min-p; returns probs."""
    device = logits.device
    temperature = to_device([p.temperature for p in params], torch.float32, device)
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_p) == 1.0 and min(top_k) < vocab:
        logits = top_k_only(logits, top_k)
    elif min(top_k) < vocab or min(top_p) < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = to_device(top_k, torch.int64, device)  # below the k-th value goes; its ties stay, as in top_k_only
        sorted_logits = sorted_logits.masked_fill(sorted_logits < sorted_logits.gather(-1, (k - 1)[:, None]),
                                                  float("-inf"))
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


def top_k_only(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Each row's logits below its k-th largest set to -inf (a value tied with the k-th stays,
    as transformers' TopKLogitsWarper keeps it); a row with k = vocab (none asked) keeps all.
    One `torch.topk` of the largest k asked, never of the whole vocabulary."""
    vocab, largest_k = logits.shape[-1], max(k for k in top_k if k < logits.shape[-1])
    k = to_device([min(k, largest_k) for k in top_k], torch.int64, logits.device)
    kth = logits.topk(largest_k, dim=-1).values.gather(-1, (k - 1)[:, None])
    keep_all = to_device([k >= vocab for k in top_k], torch.bool, logits.device)[:, None]
    return logits.masked_fill((logits < kth) & ~keep_all, float("-inf"))


class RowLogprobs(NamedTuple):
    """The logprobs of the rows that ask for them (`rows`, each its `ks` likeliest), as tensors:
    on the device while a step runs, on the host once copied."""

    rows: list[int]
    ks: list[int]
    chosen: torch.Tensor  # [num_asking] the sampled token ids
    chosen_logprobs: torch.Tensor  # [num_asking]
    top_ids: torch.Tensor  # [num_asking, max k]
    top_values: torch.Tensor  # [num_asking, max k]

    def listed(self, num_rows: int) -> list[TokenLogprobs | None]:
        """Per row, its TokenLogprobs or None (one host read of each tensor)."""
        chosen, chosen_logprobs = self.chosen.tolist(), self.chosen_logprobs.tolist()
        top_ids, top_values = self.top_ids.tolist(), self.top_values.tolist()
        out: list[TokenLogprobs | None] = [None] * num_rows
        for j, (i, n) in enumerate(zip(self.rows, self.ks)):
            out[i] = TokenLogprobs(chosen[j], chosen_logprobs[j], tuple(zip(top_ids[j][:n], top_values[j][:n])))
        return out


def row_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> RowLogprobs | None:
    """Each asking row's sampled token's log probability and its `params.logprobs` likeliest
    tokens, from the raw logits (before temperature, filters and processors, as vLLM reports
    them), left on the device (nothing waits); None when no row asks."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    index = to_device(rows, torch.int64, logits.device)
    logprobs = logits.index_select(0, index).float().log_softmax(dim=-1)
    chosen = token_ids.index_select(0, index)
    ks = [params[i].logprobs for i in rows]
    top_values, top_ids = logprobs.topk(max(max(ks), 1), dim=-1)  # each row keeps its own k of them
    return RowLogprobs(rows, ks, chosen, logprobs.gather(1, chosen[:, None])[:, 0], top_ids, top_values)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> list[TokenLogprobs | None]:
    """`row_logprobs` read on the host: per row its TokenLogprobs, None for rows that ask for none."""
    found = row_logprobs(logits, token_ids, params)
    return [None] * len(params) if found is None else found.listed(len(params))


def prompt_token_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Row i's log probability of `targets[i]` (the next prompt token) and its k likeliest."""
    logprobs = logits.float().log_softmax(dim=-1)
    target = torch.as_tensor(targets, dtype=torch.int64, device=logits.device)
    chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
    top_values, top_ids = (v.tolist() for v in logprobs.topk(max(k, 1), dim=-1))
    return [TokenLogprobs(t, c, tuple(zip(ids[:k], values[:k])))
            for t, c, ids, values in zip(targets, chosen, top_ids, top_values)]
