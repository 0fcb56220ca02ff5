"""Per-request logits processing before sampling: bad words, min_tokens, logit_bias, penalties.

Applied only to the rows whose SamplingParams ask for any (`processes_logits`), greedy rows
too (they change the argmax), in vLLM's order: bad words, then min_tokens and logit_bias, then
the repetition, frequency and presence penalties; temperature and the filters come after, in
the sampler. The penalties' token counts live on the device, a row per request in one tensor
(penalty_counts.py), and grow by each request's new tokens at each step (never rebuilt from
its whole history); `forget` gives the row back when the request ends.
"""

from __future__ import annotations

import torch

from .host_copy import to_device
from .penalty_counts import PenaltyCounts, TokenHistory, output_since
from .sampling_params import SamplingParams


class LogitsProcessors:
    def __init__(self, device: torch.device, eos_token_ids: tuple[int, ...] = ()):
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)
        self.penalty_counts = PenaltyCounts(device)
        self.grammars = None  # structured_output.Grammars, set by an engine with a tokenizer

    def forget(self, request_id: str) -> None:
        self.penalty_counts.forget(request_id)
        if self.grammars is not None:
            self.grammars.forget(request_id)

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
                 num_sampled: list[int], histories: list[TokenHistory],
                 pending_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logits [rows, vocab] (float32, processed in place) of requests that process logits.
        `num_sampled[i]`: tokens row i's request sampled on this node before this step (with
        the pending one); `pending_token_ids` [rows] (on the device): each row's token that a
        step still in flight sampled and its history lacks (penalties count it; bad words and
        grammars never run behind a step)."""
        structured = [row for row, p in enumerate(params) if p.structured_output is not None]
        if structured:
            if self.grammars is None:
                raise ValueError("structured output needs the model's tokenizer; this model has none")
            self.grammars.mask(logits, structured, request_ids, params, histories)
        masks, biases = [], []
        for row, (p, history) in enumerate(zip(params, histories)):
            for token_id in self._masked(p, num_sampled[row], history):
                masks.append((row, token_id))
            biases += [(row, token_id, bias) for token_id, bias in p.logit_bias.items()]
        if masks:
            rows, ids = zip(*masks)
            logits[to_device(list(rows), torch.int64, self.device),
                   to_device(list(ids), torch.int64, self.device)] = float("-inf")
        if biases:
            rows, ids, values = zip(*biases)
            logits.index_put_((to_device(list(rows), torch.int64, self.device),
                               to_device(list(ids), torch.int64, self.device)),
                              to_device(list(values), torch.float32, self.device), accumulate=True)
        penalized = [row for row, p in enumerate(params) if p.penalizes]
        if penalized:
            self._penalize(logits, penalized, request_ids, params, histories, pending_token_ids)
        return logits

    def _masked(self, p: SamplingParams, num_sampled: int, history: TokenHistory) -> list[int]:
        """Token ids the request may not sample now: the last token of a bad word whose other
        tokens end the output, and, before `min_tokens`, EOS and the stop tokens."""
        masked = []
        if p.bad_words_token_ids:
            longest = max(len(word) for word in p.bad_words_token_ids) - 1
            tail = output_since(p, history, max(0, _num_output(p, history) - longest))
            for word in p.bad_words_token_ids:
                prefix = word[:-1]
                if not prefix or tail[len(tail) - len(prefix):] == prefix:
                    masked.append(word[-1])
        if num_sampled < p.min_tokens:
            masked += p.stop_token_ids
            if not p.ignore_eos:
                masked += self.eos_token_ids
        return masked

    def _penalize(self, logits, rows: list[int], request_ids, params, histories, pending_token_ids) -> None:
        pick = lambda values: [values[r] for r in rows]  # noqa: E731
        seen, output_counts = self.penalty_counts.gather(pick(request_ids), pick(params), pick(histories),
                                                         logits.shape[-1])
        index = to_device(rows, torch.int64, self.device)
        sub = logits.index_select(0, index)
        if pending_token_ids is not None:  # this step's only: the history brings it into the slot later
            pending = pending_token_ids.index_select(0, index)[:, None]
            output_counts.scatter_add_(1, pending, torch.ones(pending.shape, device=self.device))
        in_output = output_counts > 0
        seen |= in_output
        column = lambda name: to_device([getattr(params[r], name) for r in rows], torch.float32, self.device)[:, None]  # noqa: E731
        repetition = column("repetition_penalty")
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
        sub -= column("frequency_penalty") * output_counts + column("presence_penalty") * in_output
        logits.index_copy_(0, index, sub)


def _num_output(p: SamplingParams, history: TokenHistory) -> int:
    return p.num_resumed_tokens + len(history.output_token_ids)
