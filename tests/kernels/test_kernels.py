"""Each Triton kernel against its pure-torch reference on random inputs. On the CPU they run
under TRITON_INTERPRET=1 at small shapes (make test); the `gpu` tests use real sizes."""

import pytest
import torch

from pdserve.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from pdserve.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from pdserve.kernels.rms_norm import rms_norm, rms_norm_ref
from pdserve.kernels.rotary import rotary, rotary_ref
from pdserve.kernels.scatter_rows import scatter_rows, scatter_rows_ref
from pdserve.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.store_kv import store_kv, store_kv_ref
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


def scatter_case(num_layers, num_slots, row, dtype, num_pool_layers, device="cpu", seed=0):
    """A pool of `num_pool_layers` layers of 2 * num_blocks rows, a staged group and its slots
    (distinct, in random order: scattered blocks)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_slots + 3
    pool = torch.randn(num_pool_layers * 2 * num_blocks, row, generator=gen).to(dtype).to(device)
    staged = torch.randn(num_layers, num_slots, row, generator=gen).to(dtype).to(device)
    slots = torch.randperm(2 * num_blocks, generator=gen)[:num_slots].to(device)
    return pool, staged, slots, 2 * num_blocks


@pytest.mark.parametrize("num_layers,num_slots,row", [(1, 1, 16), (3, 7, 100), (2, 5, 8192 + 48), (4, 33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_rows(num_layers, num_slots, row, dtype):
    # rows shorter than, equal to and longer than one BLOCK, odd widths; a span of layers
    # from layer 1, and the same rows as absolute pool rows (first_row 0, one staged layer)
    pool, staged, slots, layer_rows = scatter_case(num_layers, num_slots, row, dtype, num_layers + 2, seed=row)
    for args in [(staged, slots, layer_rows, layer_rows), (staged[:1], slots + 2 * layer_rows, 0, 0)]:
        out, expected = pool.clone(), pool.clone()
        scatter_rows(args[0], out, *args[1:], programs_per_sm=1)  # fewer programs than rows: each loops
        scatter_rows_ref(args[0], expected, *args[1:])
        assert torch.equal(out, expected)
        assert not torch.equal(expected, pool)


@pytest.mark.parametrize("group,head_dim,page", SHAPES)
@pytest.mark.parametrize("num_splits,slack", [(None, 0), (3, 0), (8, 1000)])
def test_paged_decode_attention(group, head_dim, page, num_splits, slack):
    # lengths 1, page-1, page, page+1 and a longer ragged one, in one batch; with slack the
    # bound is far above every length (as a CUDA graph captured for max_model_len passes it)
    seq_lens = [1, page - 1, page, page + 1, 3 * page + 7]
    b = make_paged_batch(seq_lens, [1] * len(seq_lens), 2 * group, 2, head_dim, page, seed=group + page)
    out = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale,
                                 max(seq_lens) + slack, num_splits=num_splits, block_n=16)
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
def test_scatter_rows_gpu():
    """A 128 MiB group of 4 Llama-3-8B layers of 2048 scattered slots into a pool of 32 layers."""
    pool, staged, slots, layer_rows = scatter_case(4, 2048, 16 * 8 * 128, torch.bfloat16, 32, device="cuda")
    out, expected = pool.clone(), pool.clone()
    scatter_rows(staged, out, slots, 5 * layer_rows, layer_rows)
    scatter_rows_ref(staged, expected, slots, 5 * layer_rows, layer_rows)
    assert torch.equal(out, expected)


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


ELEMENTWISE = [(torch.float32, 1e-5), (torch.float16, 2e-3)]
ELEMENTWISE_GPU = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]


def check_rms_norm(num_tokens, hidden, dtype, tol, device="cpu"):
    gen = torch.Generator(device).manual_seed(hidden)
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype)
    assert rel_err(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5)) < tol
    out, res = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(res, ref_res) and rel_err(out, ref_out) < tol


def check_rotary(num_tokens, num_heads, num_kv_heads, head_dim, dtype, tol, device="cpu"):
    from pdserve.engine.layers import RotaryEmbedding
    gen = torch.Generator(device).manual_seed(num_heads + head_dim)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, None).to(device)
    rope.build_cache()
    width = (num_heads + 2 * num_kv_heads) * head_dim  # q and k are strided views of a fused qkv
    qkv = torch.randn(num_tokens, width, generator=gen, device=device).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, device=device)
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    rotary(q, k, rope.cos_cache, rope.sin_cache, positions)
    rotary_ref(q_ref, k_ref, rope.cos_cache, rope.sin_cache, positions)
    assert rel_err(q, q_ref) < tol and rel_err(k, k_ref) < tol
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # v untouched


def check_silu_and_mul(num_tokens, width, dtype, tol, device="cpu"):
    gen = torch.Generator(device).manual_seed(width)
    x = torch.randn(num_tokens, 2 * width, generator=gen, device=device).to(dtype)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) < tol


@pytest.mark.parametrize("dtype,tol", ELEMENTWISE)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 576), (3, 100)])
def test_rms_norm(num_tokens, hidden, dtype, tol):
    check_rms_norm(num_tokens, hidden, dtype, tol)


@pytest.mark.parametrize("dtype,tol", ELEMENTWISE)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (9, 3, 64), (8, 1, 128), (6, 6, 10)])
def test_rotary(num_heads, num_kv_heads, head_dim, dtype, tol):
    check_rotary(5, num_heads, num_kv_heads, head_dim, dtype, tol)


@pytest.mark.parametrize("dtype,tol", ELEMENTWISE)
@pytest.mark.parametrize("num_tokens,width", [(1, 16), (5, 1536), (2, 1500)])
def test_silu_and_mul(num_tokens, width, dtype, tol):
    check_silu_and_mul(num_tokens, width, dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", ELEMENTWISE_GPU)
def test_elementwise_kernels_gpu(dtype, tol):
    for num_tokens in (1, 37, 8192):
        check_rms_norm(num_tokens, 4096, dtype, tol, "cuda")
        check_rotary(num_tokens, 32, 8, 128, dtype, tol, "cuda")
        check_silu_and_mul(num_tokens, 14336, dtype, tol, "cuda")
