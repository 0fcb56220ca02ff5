"""Each Triton kernel against its pure-torch reference on random inputs. On the CPU they run
under TRITON_INTERPRET=1 at small shapes (make test); the `gpu` tests use real sizes."""

import pytest
import torch

from kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.prefill_attention import prefill_attention, prefill_attention_ref
from kernels.store_kv import store_kv, store_kv_ref
from tests.kernels.paged_inputs import make_paged_batch, rel_err

SHAPES = [(group, head_dim, page) for group in (1, 4, 8) for head_dim in (64, 128) for page in (16, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_store_kv(dtype, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, num_kv_heads, num_blocks, page = 37, 2, 6, 16
    qkv = torch.randn(num_tokens, 5 * num_kv_heads * head_dim, generator=gen).to(dtype)
    k = qkv[:, :num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)  # strided rows
    v = qkv[:, -num_kv_heads * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * page, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding: not stored
    caches = [torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, expected[0], expected[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize("group,head_dim,page", SHAPES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_paged_decode_attention(group, head_dim, page, num_splits):
    # lengths 1, page-1, page, page+1 and a longer ragged one, in one batch
    seq_lens = [1, page - 1, page, page + 1, 3 * page + 7]
    b = make_paged_batch(seq_lens, [1] * len(seq_lens), 2 * group, 2, head_dim, page, seed=group + page)
    out = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale,
                                 max(seq_lens), num_splits=num_splits, block_n=16)
    ref = paged_decode_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
    assert rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("group,head_dim,page", SHAPES)
def test_prefill_attention(group, head_dim, page):
    # cached prefixes of 0, 1 and several blocks; chunks of 1, page-1, page, page+1 and 40
    cached = [0, 1, 2 * page + 3, 0, page]
    query_lens = [page + 1, page - 1, 40, 1, page]
    seq_lens = [c + n for c, n in zip(cached, query_lens)]
    b = make_paged_batch(seq_lens, query_lens, 2 * group, 2, head_dim, page, seed=group * head_dim)
    out = prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale,
                            max(query_lens), block_m=16, block_n=16)
    ref = prefill_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
    assert rel_err(out, ref) < 1e-3


# ---- real sizes on the device machine ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim,page", [(4, 128, 16), (8, 64, 32), (1, 128, 16)])
def test_paged_decode_attention_gpu(group, head_dim, page):
    seq_lens = [1, page, page + 1, 1000, 4097, 8000] + [(37 * i) % 3000 + 1 for i in range(26)]
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-3)):
        b = make_paged_batch(seq_lens, [1] * len(seq_lens), 8 * group, 8, head_dim, page, dtype, "cuda")
        out = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale, max(seq_lens))
        ref = paged_decode_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale)
        assert rel_err(out, ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim,page", [(4, 128, 16), (8, 64, 32), (1, 128, 16)])
def test_prefill_attention_gpu(group, head_dim, page):
    cached = [0, 1, 2048, 0, 517]
    query_lens = [2048, 1, 1000, 17, 1500]
    seq_lens = [c + n for c, n in zip(cached, query_lens)]
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-3)):
        b = make_paged_batch(seq_lens, query_lens, 8 * group, 8, head_dim, page, dtype, "cuda")
        out = prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens,
                                b.scale, max(query_lens))
        ref = prefill_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.scale)
        assert rel_err(out, ref) < tol


@pytest.mark.gpu
def test_store_kv_gpu():
    k, v = (torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(300 * 16, device="cuda")[:4096]
    slots[::7] = -1
    caches = [torch.randn(300, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    expected = [c.clone() for c in caches]
    store_kv(k, v, *caches, slots)
    store_kv_ref(k, v, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
