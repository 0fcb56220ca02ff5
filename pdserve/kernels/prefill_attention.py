"""Prefill attention: varlen causal attention of a batch of new-token chunks over the paged
cache, which already holds each sequence's earlier tokens (cached prefix, earlier chunks)
and, written by store_kv just before, the chunk's own new K/V.

Query token i of a sequence with q_len new tokens and seq_len tokens in all sits at position
seq_len - q_len + i and sees keys 0 .. that position. One program takes BLOCK_M query tokens
of one head; keys before the tile's first query need no mask, the diagonal band does.
"""

from __future__ import annotations

import torch
from .triton_import import tl, triton

from .paged_decode_attention import dot_precision


@triton.jit
def _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table, kv_head, n0, q_pos, hi, scale,
                 stride_c_block, stride_c_tok, stride_c_head, d, d_mask,
                 PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < hi
    block_ids = tl.load(table + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    rows = block_ids * stride_c_block + (n % PAGE_SIZE) * stride_c_tok + kv_head * stride_c_head
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        s = tl.where((q_pos[:, None] >= n[None, :]) & n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit(do_not_specialize=["stride_bt_seq"])  # the table width varies step to step
def _prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr, out_ptr,
        scale, num_heads, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt_seq,
        stride_c_block, stride_c_tok, stride_c_head,
        QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens before this chunk

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < q_len
    d_mask = d < HEAD_DIM
    tokens = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_tok + head * stride_q_head + d[None, :],
                mask=i_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = context + i
    kv_head = head // QUERIES_PER_KV
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq

    qk_scale = scale * 1.4426950408889634  # softmax in base 2: exp2 replaces exp
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys every query of the tile sees, in whole tiles: no mask
    unmasked_end = (context + tile * BLOCK_M) // BLOCK_N * BLOCK_N
    hi = tl.minimum(context + (tile + 1) * BLOCK_M, seq_len)  # past the tile's last query
    for n0 in range(0, unmasked_end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table, kv_head, n0, q_pos, hi,
                                 qk_scale, stride_c_block, stride_c_tok, stride_c_head, d, d_mask,
                                 PAGE_SIZE, BLOCK_N, False, PRECISION)
    for n0 in range(unmasked_end, hi, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table, kv_head, n0, q_pos, hi,
                                 qk_scale, stride_c_block, stride_c_tok, stride_c_head, d, d_mask,
                                 PAGE_SIZE, BLOCK_N, True, PRECISION)
    o = acc / l[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_o_tok + head * stride_o_head + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float, max_query_len: int, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int = 8, num_stages: int | None = None
                      ) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim], the new tokens of every sequence back to back;
    cu_seqlens_q: int32 [num_seqs + 1]; seq_lens: int32 [num_seqs], tokens in the cache after
    this chunk (>= its q_len); caches hold every key, this chunk's included. Returns
    [num_tokens, num_heads, head_dim] in q's dtype. Tiles default to 128 x 128 in 3 stages
    (tuned on an H200 with benchmarks/kernels.py --sweep); fp32 takes 64 x 64 in 2 to fit
    shared memory."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert num_heads % num_kv_heads == 0
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert cu_seqlens_q.dtype == seq_lens.dtype == block_tables.dtype == torch.int32
    assert cu_seqlens_q.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert block_tables.stride(1) == 1
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    wide = q.element_size() <= 2
    block_m = block_m or (128 if wide else 64)
    block_n = block_n or (128 if wide else 64)
    num_stages = num_stages or (3 if wide else 2)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs * num_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        QUERIES_PER_KV=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out


def prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale) -> torch.Tensor:
    """Pure torch, one sequence at a time, in float32."""
    num_heads = q.shape[1]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        rows = slice(starts[i], starts[i + 1])
        q_len = starts[i + 1] - starts[i]
        blocks = block_tables[i, :triton.cdiv(seq_len, page_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(num_heads // num_kv_heads, 1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(num_heads // num_kv_heads, 1)
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k) * scale
        causal = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - q_len)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
