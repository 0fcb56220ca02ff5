"""Protobuf <-> internal dataclasses, at the edges only (torch-free)."""

from __future__ import annotations

from collections.abc import Callable

from pdserve.engine.request import FinishReason, TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams, StructuredOutput
from pdserve.kv_transfer.connector import KVTicket
from pdserve.protos import pdserve_pb2 as pb

_DEFAULTS = SamplingParams()
FINISH_TO_PROTO = {None: pb.FINISH_REASON_UNSPECIFIED, FinishReason.STOP: pb.FINISH_REASON_STOP,
                   FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.ABORT: pb.FINISH_REASON_ABORT}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}


def sampling_from_proto(msg: pb.SamplingParams,
                        tokenize_word: Callable[[str], list[list[int]]] | None = None) -> SamplingParams:
    """Unset fields take SamplingParams' defaults; max_tokens 0 means no limit. Text
    `bad_words` need `tokenize_word` (the router's): a node takes only their token ids."""
    def get(name):
        return getattr(msg, name) if msg.HasField(name) else getattr(_DEFAULTS, name)

    max_tokens = get("max_tokens")
    bad_words = [list(w.ids) for w in msg.bad_words_token_ids]
    if msg.bad_words:
        if tokenize_word is None:
            raise ValueError("bad_words: text words need the router's tokenizer; send bad_words_token_ids")
        bad_words += [ids for word in msg.bad_words for ids in tokenize_word(word)]
    return SamplingParams(
        temperature=get("temperature"), top_p=get("top_p"), top_k=get("top_k"), min_p=get("min_p"),
        seed=get("seed"), max_tokens=None if max_tokens == 0 else max_tokens,
        stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        repetition_penalty=get("repetition_penalty"), logit_bias=dict(msg.logit_bias),
        min_tokens=msg.min_tokens, bad_words_token_ids=bad_words, logprobs=get("logprobs"),
        num_resumed_tokens=msg.num_resumed_tokens, prompt_logprobs=get("prompt_logprobs"),
        structured_output=StructuredOutput(msg.structured_output.kind, msg.structured_output.spec)
        if msg.HasField("structured_output") else None)


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            min_p=params.min_p, max_tokens=params.max_tokens or 0,
                            stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
                            presence_penalty=params.presence_penalty,
                            frequency_penalty=params.frequency_penalty,
                            repetition_penalty=params.repetition_penalty, logit_bias=params.logit_bias,
                            min_tokens=params.min_tokens, num_resumed_tokens=params.num_resumed_tokens,
                            bad_words_token_ids=[pb.TokenIds(ids=w) for w in params.bad_words_token_ids])
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.structured_output is not None:
        msg.structured_output.kind = params.structured_output.kind
        msg.structured_output.spec = params.structured_output.spec
    return msg


def logprobs_to_proto(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top],
                           top_logprobs=[v for _, v in lp.top])


def logprobs_from_proto(msg: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)))


def ticket_to_proto(t: KVTicket) -> pb.KVTicket:
    return pb.KVTicket(transfer_id=t.transfer_id, kv_endpoint=t.kv_endpoint, block_ids=t.block_ids,
                       block_size=t.block_size, num_layers=t.num_layers, num_kv_heads=t.num_kv_heads,
                       head_dim=t.head_dim, dtype=t.dtype, deadline=t.deadline,
                       model_fingerprint=t.model_fingerprint, connector=t.connector,
                       num_cached_blocks=t.num_cached_blocks, secret=t.secret, signature=t.signature,
                       ipc=t.ipc)


def ticket_from_proto(m: pb.KVTicket) -> KVTicket:
    return KVTicket(m.transfer_id, m.kv_endpoint, tuple(m.block_ids), m.block_size, m.num_layers,
                    m.num_kv_heads, m.head_dim, m.dtype, m.deadline, m.model_fingerprint, m.connector,
                    m.num_cached_blocks, m.secret, m.signature, m.ipc)


def stats_to_proto(role: str, fingerprint: str, stats: dict, **extra) -> pb.NodeStats:
    """An Engine.stats() dict (plus node fields) as NodeStats."""
    fields = {k: v for k, v in {**stats, **extra}.items() if k in pb.NodeStats.DESCRIPTOR.fields_by_name}
    return pb.NodeStats(role=role, model_fingerprint=fingerprint, **fields)
