"""Structured output: the token mask that keeps a request's output inside a JSON schema, any
JSON object, a regex, a list of choices or an EBNF grammar (xgrammar, as vLLM and SGLang use).

Each node that samples for a request (the prefill node for the first token, the decode node
after) compiles its grammar (cached by the compiler) and keeps a matcher per request. Like the
penalties' counts, a matcher's state is derived from the request's own tokens: before each
mask it accepts the output tokens it has not seen (the first token a decode node was handed,
the tokens a resumed stream carries in its prompt), so no step needs a separate update and a
resumed request continues in the same state. When the grammar is complete only the stop
tokens (EOS) are allowed, and the request ends the usual way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from .penalty_counts import TokenHistory, output_since
from .sampling_params import SamplingParams, StructuredOutput

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 256 << 20  # compiled grammars kept for reuse; distinct schemas cannot grow it past this


@dataclass
class _Matcher:
    matcher: object  # xgrammar.GrammarMatcher; None once a token broke it (no longer masked)
    num_accepted: int = 0  # output tokens it has accepted


class Grammars:
    """Compiles requests' grammars and masks their logits. xgrammar is imported at the first
    structured request, so engines that never see one do not load it."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self._compiler = None
        self._batch = None  # xgrammar.BatchGrammarMatcher, made at the first mask
        self.matchers: dict[str, _Matcher] = {}

    def check(self, spec: StructuredOutput) -> None:
        """Compiles the grammar (the compiler caches it); ValueError naming what is wrong."""
        self._compile(spec)

    def forget(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def mask(self, logits: torch.Tensor, rows: list[int], request_ids: list[str], params: list[SamplingParams],
             histories: list[TokenHistory]) -> None:
        """Sets to -inf, in place, what each listed row's grammar does not allow next."""
        import xgrammar as xgr

        # every token allowed; pinned on CUDA, so its copy below does not make the host wait for
        # the forward pass in flight (a copy from pageable memory would: host_copy.py)
        bitmask = torch.full(xgr.get_bitmask_shape(len(logits), self.vocab_size), -1, dtype=xgr.bitmask_dtype,
                             pin_memory=logits.is_cuda)
        live = [(row, state) for row in rows
                if (state := self._matcher(request_ids[row], params[row], histories[row])) is not None]
        if live:  # the rows filled on xgrammar's threads: host time the step waits for
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask([s.matcher for _, s in live], bitmask,
                                                      indices=[row for row, _ in live])
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=self.vocab_size, indices=rows)

    def _matcher(self, request_id: str, p: SamplingParams, history: TokenHistory) -> _Matcher | None:
        import xgrammar as xgr

        state = self.matchers.get(request_id)
        if state is None:
            state = self.matchers[request_id] = _Matcher(xgr.GrammarMatcher(self._compile(p.structured_output)))
        for token_id in output_since(p, history, state.num_accepted):
            if state.matcher is None:
                break
            if not state.matcher.accept_token(token_id):
                # cannot happen for tokens sampled under this mask; a request that gets here
                # is no longer held to its grammar, which the log says
                log.error("%s: token %d breaks the request's grammar; no longer masked", request_id, token_id)
                state.matcher = None
            state.num_accepted += 1
        return state if state.matcher is not None else None

    def _compile(self, spec: StructuredOutput):
        compiler = self._get_compiler()
        try:
            if spec.kind == "json":
                return compiler.compile_json_schema(spec.spec, any_whitespace=False)
            if spec.kind == "json_object":  # OpenAI's: an object, not any JSON value
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.spec)
            if spec.kind == "choice":
                choices = json.loads(spec.spec)
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
            return compiler.compile_grammar(spec.spec)
        except Exception as e:  # noqa: BLE001 - xgrammar's errors for a bad schema, regex or grammar
            raise ValueError(f"structured output: the {spec.kind} does not compile: {e}"[:500]) from None

    def _get_compiler(self):
        if self._compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer; this model has none")
            import xgrammar as xgr

            info = xgr.TokenizerInfo(self.tokenizer.vocab(), _vocab_type(self.tokenizer), vocab_size=self.vocab_size,
                                     stop_token_ids=self.eos_token_ids)
            self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_LIMIT_BYTES)
        return self._compiler


def _vocab_type(tokenizer):
    """How the tokenizer writes bytes in its vocabulary: byte-level (GPT-2's Ġ), byte fallback
    (sentencepiece's <0x0A>), or raw text."""
    import xgrammar as xgr

    decoder = tokenizer.decoder_type()
    if decoder == "ByteLevel":
        return xgr.VocabType.BYTE_LEVEL
    if decoder == "ByteFallback":
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW
