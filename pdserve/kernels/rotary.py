"""Rotary position embedding (Neox style: the two halves of each head rotate as pairs),
applied in place to the query and key heads of every token in one kernel.

The cos/sin caches are float32 [max_positions, head_dim] with equal halves (engine/layers.py
builds them); the rotation runs in float32 and rounds once. `apply_rope` is the torch form the
CPU engine runs (transformers' rotate_half).
"""

from __future__ import annotations

import torch
from .triton_import import tl, triton


@triton.jit
def _rotate_heads(ptr, stride_head, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < num_heads)[:, None] & (d < HALF)[None, :]
    first = ptr + h[:, None] * stride_head + d[None, :]  # [BLOCK_H, BLOCK_D]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (b * cos[None, :] + a * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr, num_q_heads, num_kv_heads,
                   stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache,
                   HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    d = tl.arange(0, BLOCK_D)
    cos = tl.load(cos_ptr + pos * stride_cache + d, mask=d < HALF, other=0.0)  # [BLOCK_D] float32
    sin = tl.load(sin_ptr + pos * stride_cache + d, mask=d < HALF, other=0.0)
    _rotate_heads(q_ptr + token * stride_q_tok, stride_q_head, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr + token * stride_k_tok, stride_k_head, num_kv_heads, cos, sin, HALF, BLOCK_HK, BLOCK_D)


def rotary(q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
           positions: torch.Tensor) -> None:
    """In place. q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
    (rows may be strided, each head contiguous); caches: float32 [max_positions, head_dim];
    positions: int64 [num_tokens]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and q.dtype == k.dtype
    assert q.stride(2) == 1 and k.stride(2) == 1 and head_dim % 2 == 0
    assert cos_cache.shape == sin_cache.shape and cos_cache.shape[1] == head_dim
    assert cos_cache.dtype == sin_cache.dtype == torch.float32 and cos_cache.stride() == sin_cache.stride()
    assert positions.shape == (num_tokens,) and positions.dtype == torch.int64
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, cos_cache, sin_cache, positions, num_heads, num_kv_heads, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), cos_cache.stride(0), HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(half))


def rotary_ref(q, k, cos_cache, sin_cache, positions) -> None:
    """The CPU engine's torch form (`apply_rope`), in float32, in place."""
    cos = cos_cache[positions][:, None, :]  # [num_tokens, 1, head_dim]
    sin = sin_cache[positions][:, None, :]
    q_rotated, k_rotated = apply_rope(q.float(), k.float(), cos, sin)
    q.copy_(q_rotated)
    k.copy_(k_rotated)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]; cos, sin:
    [num_tokens, 1, head_dim]. Returns the rotated q and k (new tensors)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
