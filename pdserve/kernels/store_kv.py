"""store_kv (reshape-and-cache): write each new token's K and V row into its cache slot.

Caches are `[num_blocks, block_size, num_kv_heads, head_dim]`; slot s is row s of the cache
seen as `[num_blocks * block_size, num_kv_heads * head_dim]`. Slots < 0 are skipped (padding).
"""

from __future__ import annotations

import torch
from .triton_import import tl, triton


@triton.jit(do_not_specialize=["num_tokens"])  # any batch: one compiled kernel
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_tokens,
                     stride_k, stride_v, ROW: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_ROW: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    slots = tl.load(slot_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    mask = (slots >= 0)[:, None] & (cols < ROW)[None, :]
    src = tokens.to(tl.int64)[:, None]
    dst = slots[:, None] * ROW + cols[None, :]
    k = tl.load(k_ptr + src * stride_k + cols[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    v = tl.load(v_ptr + src * stride_v + cols[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (rows may be strided, each row contiguous);
    caches: contiguous [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping: int64."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(2) == 1 and v.stride(1) == head_dim
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert slot_mapping.dtype == torch.int64
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    block_row = min(triton.next_power_of_2(row), 1024)
    block_t = 8
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(row, block_row))
    _store_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping, num_tokens, k.stride(0), v.stride(0),
                           ROW=row, BLOCK_T=block_t, BLOCK_ROW=block_row)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Pure torch: the same writes (the CPU engine's form)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v
