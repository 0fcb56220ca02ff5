"""The KV cache as one pool: every layer's K and V cache is a view of one tensor
`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, so that one block of one
layer's K or V is one row of `pool_rows`, `[num_layers * 2 * num_blocks, block_numel]`:
row `(2 * layer + kv) * num_blocks + block_id`. A receiver writes a whole group of layers
into their blocks with one `index_copy_` on those rows, not two copies per layer.
"""

from __future__ import annotations

import torch


def allocate_kv_caches(num_layers: int, block_shape: tuple[int, ...], num_blocks: int, dtype: torch.dtype,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k_cache, v_cache) per layer, each `[num_blocks, *block_shape]`, zeroed, views of one pool."""
    pool = torch.zeros((num_layers, 2, num_blocks, *block_shape), dtype=dtype, device=device)
    return [(pool[layer, 0], pool[layer, 1]) for layer in range(num_layers)]


def kv_slots(block_ids: list[int], num_blocks: int) -> list[int]:
    """The slots of these blocks' K, then of their V: a slot is `kv * num_blocks + block_id`."""
    return [*block_ids, *(num_blocks + b for b in block_ids)]


def layer_rows(slots, layer, num_blocks: int):
    """The pool rows of `slots` in `layer` (numpy arrays or tensors, broadcast: `layer` may be a
    column of layers)."""
    return layer * (2 * num_blocks) + slots


def slot_rows(slots: torch.Tensor, num_layers: int, num_blocks: int) -> torch.Tensor:
    """`[num_layers, len(slots)]`: each slot's pool row in each layer, on the device of `slots`."""
    return layer_rows(slots, torch.arange(num_layers, device=slots.device)[:, None], num_blocks)


def pool_rows(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """`[num_layers * 2 * num_blocks, block_numel]` over the caches' memory, or None when they
    are not laid out as `allocate_kv_caches` lays them out."""
    first = kv_caches[0][0]
    num_blocks, row = first.shape[0], first[0].numel()
    for i, cache in enumerate(c for pair in kv_caches for c in pair):
        if (not cache.is_contiguous() or cache.shape != first.shape or cache.dtype != first.dtype
                or cache.device != first.device
                or cache.data_ptr() != first.data_ptr() + i * first.nbytes):
            return None
    num_rows = 2 * len(kv_caches) * num_blocks
    if first.storage_offset() * first.element_size() + num_rows * row * first.element_size() > \
            first.untyped_storage().nbytes():
        return None
    return first.as_strided((num_rows, row), (row, 1))
