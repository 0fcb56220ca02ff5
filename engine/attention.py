"""Attention over the paged KV cache: batch metadata and the torch (reference) back-end.

The cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`.
Token t of a sequence lives in slot `block_table[t // block_size] * block_size + t % block_size`.
A back-end first writes the step's new K/V into their slots, then lets each new query token
attend to every earlier token of its sequence (cached prefix, earlier chunks, this chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1: do not store
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32, offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32, padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class TorchAttentionBackend:
    """Reference back-end in plain torch: decodes batched through one padded gather, each
    prefill chunk on its own. Correct on any device; the Triton back-end is for speed."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        decodes = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
        if decodes:
            self._decode(q, k_cache, v_cache, meta, decodes, scale, out)
        starts = meta.cu_seqlens_q.tolist() if len(decodes) < meta.num_seqs else []
        for i, q_len in enumerate(meta.query_lens_cpu):
            if q_len > 1:
                rows = slice(starts[i], starts[i] + q_len)
                out[rows] = self._prefill(q[rows], k_cache, v_cache, meta.block_tables[i],
                                          meta.seq_lens_cpu[i], scale)
        return out

    def _decode(self, q, k_cache, v_cache, meta, seqs, scale, out) -> None:
        rows = torch.tensor(seqs, device=q.device)
        token_rows = meta.cu_seqlens_q[rows].long()
        seq_lens = meta.seq_lens[rows]
        max_len = max(meta.seq_lens_cpu[i] for i in seqs)
        block_size = k_cache.shape[1]
        tables = meta.block_tables[rows, :-(-max_len // block_size)].long()
        keys = _gather(k_cache, tables)  # [num_decodes, padded_len, num_kv_heads, head_dim]
        values = _gather(v_cache, tables)
        valid = torch.arange(keys.shape[1], device=q.device)[None, :] < seq_lens[:, None]
        o = _sdpa(q[token_rows][:, None], keys, values, valid[:, None, None, :], scale)
        out[token_rows] = o[:, 0]

    def _prefill(self, q, k_cache, v_cache, block_table, seq_len, scale) -> torch.Tensor:
        q_len = q.shape[0]
        block_size = k_cache.shape[1]
        table = block_table[:-(-seq_len // block_size)].long()[None]
        keys = _gather(k_cache, table)[:, :seq_len]
        values = _gather(v_cache, table)[:, :seq_len]
        # query j sits at position seq_len - q_len + j and sees keys 0 .. that position
        causal = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - q_len)
        return _sdpa(q[None], keys, values, causal[None, None], scale)[0]


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_seqs, num_blocks] block ids -> [num_seqs, num_blocks * block_size, kv_heads, dim]."""
    rows = cache.flatten(1).index_select(0, tables.reshape(-1))
    return rows.view(tables.shape[0], -1, *cache.shape[2:])


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """GQA attention without repeating K/V: the query heads of each KV head are folded into
    the query-length axis. q: [b, q_len, heads, dim]; k, v: [b, kv_len, kv_heads, dim];
    mask: bool [b or 1, 1, q_len, kv_len], True = attend. Returns [b, q_len, heads, dim]."""
    b, q_len, num_heads, dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    # [b, q_len, kv_heads, group, dim] -> [b, kv_heads, group * q_len, dim]
    q = q.view(b, q_len, num_kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, group * q_len, dim)
    mask = mask.repeat(1, 1, group, 1) if q_len > 1 else mask
    o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.view(b, num_kv_heads, group, q_len, dim).permute(0, 3, 1, 2, 4).reshape(b, q_len, num_heads, dim)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Writes each token's K/V row into its slot; slots < 0 are skipped."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


class TritonAttentionBackend:
    """The Triton kernels: store_kv, then paged decode attention when every sequence has one
    new token, else varlen prefill attention over the paged cache (which also serves the
    one-token sequences of a mixed batch)."""

    name = "triton"

    def __init__(self):
        from kernels.paged_decode_attention import paged_decode_attention
        from kernels.prefill_attention import prefill_attention
        from kernels.store_kv import store_kv
        self._store_kv, self._decode, self._prefill = store_kv, paged_decode_attention, prefill_attention

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.max_query_len == 1:
            return self._decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len)
        return self._prefill(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, scale,
                             meta.max_query_len)


def get_attention_backend(name: str, device: torch.device):
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {name!r}")
