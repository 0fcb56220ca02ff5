"""Sampling parameters and their validation (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """The output must match: `json` a JSON schema (its text), `json_object` any JSON object,
    `regex` a regular expression, `choice` one of a JSON list of strings, `grammar` an EBNF
    grammar (xgrammar's dialect, GBNF-like)."""

    kind: str
    spec: str = ""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 is greedy. top_k -1 (or 0) and top_p 1 and min_p 0 disable those filters.
    max_tokens None means "until the context is full". The penalties follow OpenAI and vLLM:
    presence and frequency penalties count this request's output tokens; the repetition
    penalty divides a positive logit (multiplies a negative one) of any token seen in prompt or
    output. `logit_bias` adds to a token's logit; `min_tokens` masks EOS and the stop tokens
    until that many tokens came out; `bad_words_token_ids`: a token that would complete one of
    these sequences at the output's end is masked. `logprobs` k: the sampled token's log
    probability and the k likeliest (from the model's raw logits); `prompt_logprobs` k the same
    for each prompt token after the first (such a prompt skips the prefix cache: every position
    must be computed). `num_resumed_tokens`: the
    prompt's last tokens are this request's own earlier output (a stream resumed on another
    node); penalties, min_tokens, max_tokens and a seed's draws count them as output.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: int | None = None
    num_resumed_tokens: int = 0
    structured_output: StructuredOutput | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob (after the first) and its k likeliest

    @property
    def penalizes(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_latest_tokens(self) -> bool:
        """Whether sampling reads the latest tokens on the host (a bad word's tail, a grammar's
        matcher), so that no step may be launched before the previous one's tokens are read.
        Penalties may run ahead: a launched step adds the token it is behind on the device."""
        return bool(self.bad_words_token_ids) or self.structured_output is not None

    @property
    def processes_logits(self) -> bool:
        return self.penalizes or self.needs_latest_tokens or bool(self.logit_bias) or self.min_tokens > 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the first bad field."""
        if not _is_number(self.temperature) or self.temperature < 0 or math.isnan(self.temperature):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (-1, 0)):
            raise ValueError(f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        for token_id in self.stop_token_ids:
            _check_token_id("stop_token_ids", token_id, vocab_size)
        self._validate_processors(vocab_size)

    def _validate_processors(self, vocab_size: int | None) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], "
                             f"got {self.repetition_penalty!r}")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases")
        for token_id, bias in self.logit_bias.items():
            _check_token_id("logit_bias", token_id, vocab_size)
            if not _is_number(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: the bias of token {token_id} must be in [-100, 100], got {bias!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if len(self.bad_words_token_ids) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words: at most {MAX_BAD_WORDS} words")
        for word in self.bad_words_token_ids:
            if not word or len(word) > MAX_BAD_WORD_TOKENS:
                raise ValueError(f"bad_words: each word must be 1 to {MAX_BAD_WORD_TOKENS} tokens")
            for token_id in word:
                _check_token_id("bad_words", token_id, vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        so = self.structured_output
        if so is not None and (not isinstance(so, StructuredOutput) or so.kind not in STRUCTURED_KINDS
                               or not isinstance(so.spec, str) or len(so.spec) > MAX_STRUCTURED_SPEC_CHARS):
            raise ValueError(f"structured_output: kind must be one of {', '.join(STRUCTURED_KINDS)} with a spec "
                             f"of at most {MAX_STRUCTURED_SPEC_CHARS} characters")
        if so is not None and self.ignore_eos:
            raise ValueError("ignore_eos: a structured output ends with its grammar; it cannot ignore EOS")
        if not _is_int(self.num_resumed_tokens) or self.num_resumed_tokens < 0:
            raise ValueError(f"num_resumed_tokens must be an integer >= 0, got {self.num_resumed_tokens!r}")


MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 1024
MAX_BAD_WORDS = 128
MAX_BAD_WORD_TOKENS = 32
MAX_REPETITION_PENALTY = 10.0
MAX_STRUCTURED_SPEC_CHARS = 1 << 16


def _check_token_id(name: str, token_id, vocab_size: int | None) -> None:
    if not _is_int(token_id) or token_id < 0 or (vocab_size and token_id >= vocab_size):
        raise ValueError(f"{name}: {token_id!r} is not a token id of this model (vocabulary of {vocab_size})")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isinf(x)
