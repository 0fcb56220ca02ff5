"""GGUF weights as float32 torch tensors in Hugging Face's layout.

llama.cpp's converter permutes the rows of Llama's Q and K projections (for its interleaved
RoPE); we undo that so the weights match Hugging Face's layout and RoPE convention.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .gguf_file import GGUFTensor, hf_tensor_name, read_gguf


def iter_gguf_weights(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor, dequantized and un-permuted."""
    for t in read_gguf(path).tensors:
        name = hf_tensor_name(t.name)
        w = dequantize(t)
        if cfg.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rope_rows(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        yield name, w


def dequantize(t: GGUFTensor) -> torch.Tensor:
    """float32 tensor of `t.shape`; F32/F16/BF16/Q8_0/Q4_0/Q4_1 in torch, others via gguf."""
    raw = torch.from_numpy(np.array(t.data))  # a private copy: the memmap is read-only
    if t.ggml_type == 0:  # F32
        return raw.view(torch.float32).reshape(t.shape)
    if t.ggml_type in (1, 30):  # F16, BF16
        return raw.view(torch.float16 if t.ggml_type == 1 else torch.bfloat16).float().reshape(t.shape)
    if t.ggml_type in _BLOCK_BYTES:
        blocks = raw.view(-1, _BLOCK_BYTES[t.ggml_type])
        scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [num_blocks, 1]
        if t.ggml_type == 8:  # Q8_0: d, 32 x int8
            return (blocks[:, 2:].view(torch.int8).float() * scale).reshape(t.shape)
        quants = blocks[:, -16:]  # low nibbles are elements 0..15, high nibbles 16..31
        q = torch.cat([quants & 0xF, quants >> 4], dim=1).float()
        if t.ggml_type == 2:  # Q4_0: d, 16 bytes; value = d * (q - 8)
            return ((q - 8) * scale).reshape(t.shape)
        low = blocks[:, 2:4].contiguous().view(torch.float16).float()  # Q4_1: d, m; d * q + m
        return (q * scale + low).reshape(t.shape)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    return torch.from_numpy(gguf_dequantize(t.data, GGMLQuantizationType(t.ggml_type)).astype(np.float32).reshape(t.shape))


_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}  # Q4_0, Q4_1, Q8_0: bytes per block of 32 weights


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs interleaved) -> (halves)."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
