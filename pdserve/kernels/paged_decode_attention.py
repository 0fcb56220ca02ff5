"""Paged decode attention: one query token per sequence against its paged KV history.

GQA-aware: one program holds all query heads of one KV head, so each K/V row is read once.
Split-KV (flash-decoding): each sequence's context is cut into `num_splits` equal splits
handled by separate programs, each writing a partial output and its log-sum-exp; a second
kernel merges the splits. The split length is computed per sequence on the device, so the
grid depends only on `num_splits`: a CUDA graph captured once serves every context length.
"""

from __future__ import annotations

import torch
from .triton_import import tl, triton


# the batch varies step to step (table width, splits): one compiled kernel serves all
@triton.jit(do_not_specialize=["num_splits", "stride_bt_seq"])
def _paged_decode_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_ptr, lse_ptr,
        scale, num_splits,
        stride_q_seq, stride_q_head, stride_o_seq, stride_o_head, stride_bt_seq,
        stride_c_block, stride_c_tok, stride_c_head,
        QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
        PRECISION: tl.constexpr):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N  # whole BLOCK_N tiles
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * QUERIES_PER_KV + g
    g_mask = g < QUERIES_PER_KV
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    # softmax in base 2: scores are pre-multiplied by log2(e), so exp2 replaces exp
    qk_scale = scale * 1.4426950408889634
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block_ids = tl.load(table + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        rows = block_ids * stride_c_block + (n % PAGE_SIZE) * stride_c_tok + kv_head * stride_c_head
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    has_keys = l > 0  # false only for a split past the end of this sequence (a short one)
    o = acc / tl.where(has_keys, l, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        tl.store(out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (seq * num_kv_heads * QUERIES_PER_KV + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=out_mask)
        tl.store(lse_ptr + row, tl.where(has_keys, m + tl.log2(l), float("-inf")), mask=g_mask)  # base 2


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_splits, stride_o_seq, stride_o_head,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    row0 = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(lse_ptr + row0 + s, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))  # every sequence has >= 1 key: the max is finite
    weights = weights / tl.sum(weights, axis=0)
    part = tl.load(part_ptr + (row0 + s)[:, None] * HEAD_DIM + d[None, :],
                   mask=s_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    o = tl.sum(part * weights[:, None], axis=0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + d, o.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int, num_splits: int | None = None, block_n: int = 64,
                           num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: int32 [num_seqs, max_blocks]; seq_lens: int32 [num_seqs], each >= 1 and
    <= max_seq_len (which only sets how many splits there are: a bound is enough). Returns
    [num_seqs, num_heads, head_dim] in q's dtype."""
    num_seqs, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert num_heads % num_kv_heads == 0
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert block_tables.dtype == seq_lens.dtype == torch.int32 and block_tables.stride(1) == 1
    assert block_tables.shape[0] == seq_lens.shape[0] == num_seqs
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * num_kv_heads, max_seq_len, q.device)
    num_splits = max(1, min(num_splits, triton.cdiv(max_seq_len, block_n)))
    direct = num_splits == 1
    part = lse = out  # unused when direct
    if not direct:
        part = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    _paged_decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part, lse, scale, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        QUERIES_PER_KV=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, PAGE_SIZE=page_size, BLOCK_N=block_n, DIRECT=direct,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part, lse, out, num_splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_splits))
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (Triton's default for them is tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def choose_num_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Enough splits to give every SM about four programs, none shorter than 1024 tokens
    (tuned on an H200 with benchmarks/kernels.py --sweep)."""
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = triton.cdiv(4 * num_sms, num_programs)
    return max(1, min(wanted, triton.cdiv(max_seq_len, 1024)))


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """Pure torch, one sequence at a time, in float32."""
    num_heads = q.shape[1]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        blocks = block_tables[i, :triton.cdiv(seq_len, page_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float()  # [seq_len, num_kv_heads, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i].float(), k) * scale
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
