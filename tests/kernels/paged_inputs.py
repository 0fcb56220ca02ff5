"""Random paged-attention inputs: caches full of noise, each sequence's blocks scattered."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    scale: float


def make_paged_batch(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
                     head_dim: int, page_size: int, dtype=torch.float32, device="cpu",
                     seed: int = 0) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // page_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()  # blocks scattered over the cache
    width = max(blocks_per_seq) + 2
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):  # padding past a table's end stays random
        tables[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    shape = (num_blocks, page_size, num_kv_heads, head_dim)
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return PagedBatch(
        q=rand(cu[-1], num_heads, head_dim).to(device), k_cache=rand(*shape).to(device),
        v_cache=rand(*shape).to(device), block_tables=tables.to(device),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), scale=head_dim ** -0.5)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return float((out.float() - ref.float()).norm() / ref.float().norm())
