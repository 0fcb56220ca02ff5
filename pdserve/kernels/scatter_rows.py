"""scatter_rows: write the rows of a received group into the KV pool (the nccl connector's
landing, kv_transfer/nccl.py `PairPayloads`).

The pool is `[num_pool_rows, row_numel]` (engine/kv_pool.py `pool_rows`: one row per block of
K or V of one layer); the group is staged as `[num_layers, num_slots, row_numel]`, and its
layer l, slot s goes to pool row `first_row + l * layer_rows + slots[s]`. A few programs per
SM walk the rows (a persistent loop), each row in wide vector loads: NCCL's receive kernels
run beside it and still find room on every SM, and the copy keeps ahead of NVLink (torch's
`index_copy_` moves one element a thread and fills every SM: about as slow as the wire).
"""

from __future__ import annotations

import functools

import torch
from .triton_import import tl, triton


@triton.jit(do_not_specialize=["num_rows", "num_slots", "first_row", "layer_rows"])
def _scatter_rows_kernel(staged_ptr, pool_ptr, slots_ptr, num_rows, num_slots, first_row, layer_rows,
                         ROW: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for i in range(tl.program_id(0), num_rows, tl.num_programs(0)):  # staged row i: layer, slot
        layer = i // num_slots
        slot = tl.load(slots_ptr + (i - layer * num_slots))  # int64
        src = staged_ptr + i * ROW  # int32: the launcher checks that staged is under 2**31 elements
        dst = pool_ptr + (first_row + layer * layer_rows + slot) * ROW  # int64, as slots are
        for start in range(0, ROW, BLOCK):
            mask = start + cols < ROW
            tl.store(dst + start + cols, tl.load(src + start + cols, mask=mask), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def scatter_rows(staged: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, first_row: int = 0,
                 layer_rows: int = 0, programs_per_sm: int = 2) -> None:
    """pool[first_row + l * layer_rows + slots[s]] = staged[l, s] for every layer l and slot s.
    staged: contiguous `[num_layers, num_slots, row_numel]`; pool: contiguous `[num_pool_rows,
    row_numel]` of the same dtype and device; slots: int64 `[num_slots]`, every target row in
    the pool (not checked on the device: the caller's tickets were)."""
    num_layers, num_slots, row = staged.shape
    assert pool.dim() == 2 and pool.shape[1] == row, (pool.shape, staged.shape)
    assert staged.is_contiguous() and pool.is_contiguous() and slots.is_contiguous()
    assert staged.dtype == pool.dtype and slots.dtype == torch.int64 and slots.shape == (num_slots,)
    assert staged.device == pool.device == slots.device
    assert staged.numel() < 2**31 and pool.shape[0] < 2**31, (staged.shape, pool.shape)
    num_rows = num_layers * num_slots
    if num_rows == 0:
        return
    grid = (min(num_rows, programs_per_sm * _num_sms(pool.device)),)
    block = min(triton.next_power_of_2(row), 8192)
    _scatter_rows_kernel[grid](staged, pool, slots, num_rows, num_slots, first_row, layer_rows,
                               ROW=row, BLOCK=block, num_warps=8 if block >= 4096 else 4)


def scatter_rows_ref(staged: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, first_row: int = 0,
                     layer_rows: int = 0) -> None:
    """Pure torch: the same writes, with one `index_copy_` (kv_transfer/nccl.py does the same
    into CPU pools, where Triton may not be installed)."""
    layers = torch.arange(staged.shape[0], device=slots.device)[:, None]
    rows = (first_row + layers * layer_rows + slots[None, :]).reshape(-1)
    pool.index_copy_(0, rows, staged.reshape(-1, staged.shape[-1]))
