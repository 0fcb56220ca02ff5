"""Kernel speed on the GPU against ceilings measured in the same run.

  decode attention   K/V bytes read / time, as a fraction of a device-to-device copy
                     (bytes read + written / time), Llama-3-8B shape, bf16, block 16
  prefill attention  causal TFLOP/s against torch SDPA (flash) on the same contiguous shapes
  store_kv           bytes moved / time, as a fraction of the copy

Every kernel is checked against its reference before it is timed. Usage:
    python benchmarks/kernels.py [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from pdserve.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from pdserve.kernels.store_kv import store_kv  # noqa: E402
from tests.kernels.paged_inputs import make_paged_batch, rel_err  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def bench(fn) -> float:
    """Median seconds of fn (CUDA events, after warm-up)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    src = torch.randn(2**28, device="cuda", dtype=DTYPE)  # 512 MiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / bench(lambda: dst.copy_(src))


def decode_row(batch: int, context: int, copy_bw: float) -> dict:
    b = make_paged_batch([context] * batch, [1] * batch, HEADS, KV_HEADS, HEAD_DIM, PAGE, DTYPE, "cuda")
    run = lambda: paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale, context)  # noqa: E731
    err = rel_err(run(), paged_decode_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.scale))
    seconds = bench(run)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * b.k_cache.element_size()
    return {"kernel": "decode", "shape": f"{batch} x {context}", "ms": seconds * 1e3,
            "value": kv_bytes / seconds / 1e12, "unit": "TB/s", "ratio": kv_bytes / seconds / copy_bw,
            "target": 0.75 if (batch, context) in ((64, 4096), (16, 4096)) else
            (0.5 if (batch, context) == (256, 1024) else None), "rel_err": err}


def causal_flops(q_len: int, kv_len: int) -> float:
    keys_seen = sum(kv_len - q_len + i + 1 for i in range(q_len))
    return 4.0 * keys_seen * HEAD_DIM * HEADS


def prefill_row(num_seqs: int, cached: int, new: int) -> dict:
    total = cached + new
    b = make_paged_batch([total] * num_seqs, [new] * num_seqs, HEADS, KV_HEADS, HEAD_DIM, PAGE, DTYPE, "cuda")
    run = lambda: prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens,  # noqa: E731
                                    b.scale, new)
    err = float("nan")
    if new * total <= 4096 * 4096:  # the reference's score matrix must fit: check sequence 0
        err = rel_err(run()[:new], prefill_attention_ref(b.q[:new], b.k_cache, b.v_cache, b.block_tables[:1],
                                                         b.cu_seqlens_q[:2], b.seq_lens[:1], b.scale))
    seconds = bench(run)
    # SDPA (flash) on the same shapes, contiguous: q [n, H, new, D], k/v [n, H, total, D]
    q = torch.randn(num_seqs, HEADS, new, HEAD_DIM, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(num_seqs, HEADS, total, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(2))
    mask = causal_lower_right(new, total) if cached else None
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask, is_causal=mask is None)
        sdpa_seconds = bench(sdpa)
    flops = num_seqs * causal_flops(new, total)
    return {"kernel": "prefill", "shape": f"{num_seqs} x ({cached} cached + {new} new)", "ms": seconds * 1e3,
            "value": flops / seconds / 1e12, "unit": "TFLOP/s", "ratio": sdpa_seconds / seconds, "target": 0.8,
            "sdpa_tflops": flops / sdpa_seconds / 1e12, "rel_err": err}


def store_kv_row(num_tokens: int, copy_bw: float) -> dict:
    k, v = (torch.randn(num_tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(2))
    num_blocks = num_tokens // PAGE + 8
    caches = [torch.empty(num_blocks, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(2)]
    slots = torch.randperm(num_blocks * PAGE, device="cuda")[:num_tokens]
    seconds = bench(lambda: store_kv(k, v, *caches, slots))
    moved = 4 * k.numel() * k.element_size()  # read k and v, write both
    return {"kernel": "store_kv", "shape": f"{num_tokens} tokens", "ms": seconds * 1e3,
            "value": moved / seconds / 1e12, "unit": "TB/s", "ratio": moved / seconds / copy_bw, "target": 0.7,
            "rel_err": 0.0}


def sweep() -> None:
    """Times launch configurations of both attention kernels; prints the best few of each."""
    import itertools
    results = []
    for batch, context in ((16, 4096), (1, 32768), (64, 4096)):
        b = make_paged_batch([context] * batch, [1] * batch, HEADS, KV_HEADS, HEAD_DIM, PAGE, DTYPE, "cuda")
        for splits, block_n, warps, stages in itertools.product((None, 8, 16, 32), (32, 64, 128), (4, 8), (2, 3)):
            try:
                t = bench(lambda: paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens,
                                                         b.scale, context, splits, block_n, warps, stages))
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                print("skip", splits, block_n, warps, stages, type(e).__name__)
                continue
            results.append((f"decode {batch}x{context}", t * 1e3, f"splits={splits} block_n={block_n} "
                            f"warps={warps} stages={stages}"))
    b = make_paged_batch([4096] * 4, [4096] * 4, HEADS, KV_HEADS, HEAD_DIM, PAGE, DTYPE, "cuda")
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        try:
            t = bench(lambda: prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q,
                                                b.seq_lens, b.scale, 4096, block_m, block_n, warps, stages))
        except Exception as e:  # noqa: BLE001
            print("skip", block_m, block_n, warps, stages, type(e).__name__)
            continue
        results.append(("prefill 4x4096", t * 1e3, f"block_m={block_m} block_n={block_n} warps={warps} "
                        f"stages={stages}"))
    for name in dict.fromkeys(r[0] for r in results):
        best = sorted((r for r in results if r[0] == name), key=lambda r: r[1])[:4]
        for r in best:
            print(f"{r[0]:<20} {r[1]:8.4f} ms  {r[2]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time launch configurations, then exit")
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.sweep:
        return sweep()
    copy_bw = copy_bandwidth()
    rows = [decode_row(b, c, copy_bw) for b, c in ((1, 32768), (16, 4096), (64, 4096), (256, 1024))]
    rows += [prefill_row(n, c, m) for n, c, m in ((4, 0, 4096), (1, 0, 16384), (4, 2048, 2048))]
    rows += [store_kv_row(n, copy_bw) for n in (16384, 65536)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_tb_s": copy_bw / 1e12,
                                          "rows": rows}, indent=2))
    print(f"\n{torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'kernel':<9} {'shape':<28} {'ms':>8} {'achieved':>16} {'ratio':>7} {'target':>7} {'rel err':>8}")
    for r in rows:
        target = f">={r['target']}" if r["target"] else ""
        print(f"{r['kernel']:<9} {r['shape']:<28} {r['ms']:>8.3f} {r['value']:>8.1f} {r['unit']:<7} "
              f"{r['ratio']:>6.2f}x {target:>7} {r['rel_err']:>8.1e}")
    print("ratio: decode and store_kv = bandwidth / copy bandwidth; prefill = SDPA time / our time")


if __name__ == "__main__":
    main()
