"""Building blocks of a Llama decoder: RMSNorm, rotary embedding, SwiGLU activation.

On a GPU each runs as one fused Triton kernel (kernels/rms_norm.py, rotary.py, silu_and_mul.py);
on the CPU as those kernels' pure-torch references, which need no Triton.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pdserve.kernels.rms_norm import rms_norm, rms_norm_ref
from pdserve.kernels.rotary import apply_rope, rotary
from pdserve.kernels.silu_and_mul import silu_and_mul as silu_and_mul_fused, silu_and_mul_ref

from .config import RopeScaling


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 like transformers', optionally fused with the residual add:
    with `residual`, returns (norm(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with Llama-3 scaling when given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (transformers' rotate_half) from a precomputed cos/sin cache."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: RopeScaling | None):
        super().__init__()
        self.args = (head_dim, max_positions, theta, scaling)
        self.register_buffer("cos_cache", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin_cache", torch.empty(max_positions, head_dim), persistent=False)
        self.build_cache()

    def build_cache(self) -> None:
        """(Re)computes the cos/sin cache in float32, e.g. after `Module.to_empty`."""
        head_dim, max_positions, theta, scaling = self.args
        if self.cos_cache.is_meta:
            return
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(self.cos_cache.device)
        positions = torch.arange(max_positions, dtype=torch.float32, device=self.cos_cache.device)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.cos_cache = emb.cos()
        self.sin_cache = emb.sin()

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> "StepRope":
        """What every layer of a step needs to rotate its q and k (looked up once per step)."""
        if positions.is_cuda:
            return StepRope(self, positions, None)
        return StepRope(self, positions, (self.cos_cache[positions].to(dtype)[:, None, :],
                                          self.sin_cache[positions].to(dtype)[:, None, :]))


class StepRope:
    """RoPE for one step's tokens: the fused kernel on a GPU; on the CPU cos and sin of each
    token's position, [num_tokens, 1, head_dim] each."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor, cos_sin):
        self.rotary, self.positions, self.cos_sin = rotary, positions, cos_sin

    def apply(self, q: torch.Tensor, k: torch.Tensor):
        if self.cos_sin is None:
            rotary(q, k, self.rotary.cos_cache, self.rotary.sin_cache, self.positions)  # in place
            return q, k
        return apply_rope(q, k, *self.cos_sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_fused(gate_up) if gate_up.is_cuda else silu_and_mul_ref(gate_up)
