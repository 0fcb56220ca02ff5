"""SwiGLU's activation: silu(gate) * up over the fused gate/up projection's output, in one
kernel. Rounding follows torch: silu is rounded to the dtype before the product."""

from __future__ import annotations

import torch
from .triton_import import tl, triton
import torch.nn.functional as F


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, width, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * width + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * width] (gate, then up), rows contiguous -> [num_tokens, width]."""
    num_tokens, double = x.shape
    assert double % 2 == 0 and x.stride(1) == 1
    width = double // 2
    out = torch.empty(num_tokens, width, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(1024, triton.next_power_of_2(width))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(width, block))](x, out, width, x.stride(0), BLOCK=block)
    return out


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in torch ops: the same results, and the CPU engine's form."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
