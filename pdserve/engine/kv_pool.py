"""The KV cache as one pool: every layer's K and V cache is a view of one tensor
`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, so that one block of one
layer's K or V is one row of `pool_rows`, `[num_layers * 2 * num_blocks, block_numel]`:
row `(2 * layer + kv) * num_blocks + block_id`. A receiver writes a whole group of layers
into their blocks with one copy on those rows (kernels/scatter_rows.py), not two copies per
layer; a sender gathers a layer's blocks with one `index_select` into `LayerSlabs`.
"""

from __future__ import annotations

import math
import os
import uuid

import torch

SLAB_BYTES = 1 << 30  # LayerSlabs: gathered layers in one tensor (one layer at least)
_MEMFDS: dict[int, tuple[int, str]] = {}  # a shared pool's storage address -> its memfd and name


def allocate_kv_caches(num_layers: int, block_shape: tuple[int, ...], num_blocks: int, dtype: torch.dtype,
                       device: torch.device, shared: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k_cache, v_cache) per layer, each `[num_blocks, *block_shape]`, zeroed, views of one pool.
    `shared` (CPU): the pool lives in a memfd, which processes on this host may map
    (kv_transfer/shared_pool.py); it lives as long as this process."""
    shape = (num_layers, 2, num_blocks, *block_shape)
    if shared and device.type == "cpu":
        pool = _memfd_tensor(math.prod(shape), dtype).view(shape)
    else:
        pool = torch.zeros(shape, dtype=dtype, device=device)
    return [(pool[layer, 0], pool[layer, 1]) for layer in range(num_layers)]


def _memfd_tensor(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor mapped from a new memfd (named with a random token, so that a peer that
    opens it by /proc path can tell it is this one)."""
    name = f"pdserve-kv-{uuid.uuid4().hex}"
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, max(1, numel * dtype.itemsize))
    flat = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype)
    _MEMFDS[flat.untyped_storage().data_ptr()] = (fd, name)
    return flat


def shared_memfd(tensor: torch.Tensor) -> tuple[int, str, int] | None:
    """(fd, name, byte offset of `tensor` in it) when `tensor` lies in a memfd pool made here."""
    found = _MEMFDS.get(tensor.untyped_storage().data_ptr())
    if found is None:
        return None
    return *found, tensor.data_ptr() - tensor.untyped_storage().data_ptr()


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


class LayerSlabs:
    """Where a step's layers of KV are gathered to be sent: slabs of consecutive layers, each
    one tensor of about `slab_bytes` (one layer at least). Layers handed over one after the
    other thus lie back to back, and the nccl connector sends a run of them as one message
    without joining them first (kv_transfer/nccl.py `_joined`). A step's KV is one slab up to
    `slab_bytes` (as large as before: a connector holds each layer until its transfer is done).
    Who frees a slab: nobody here holds it past the next slab; the connector's views keep it
    until its transfers are done."""

    def __init__(self, num_layers: int, layer_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, slab_bytes: int = SLAB_BYTES):
        self.num_layers, self.layer_shape, self.dtype, self.device = num_layers, tuple(layer_shape), dtype, device
        layer_bytes = math.prod(layer_shape) * dtype.itemsize
        self.layers_per_slab = max(1, min(num_layers, slab_bytes // max(1, layer_bytes)))
        self._slab: torch.Tensor | None = None  # [layers, *layer_shape]
        self._first = 0  # the layer of self._slab[0]

    def layer(self, layer: int) -> torch.Tensor:
        """The `layer_shape` tensor (contiguous, uninitialised) that `layer` is gathered into."""
        if self._slab is None or not self._first <= layer < self._first + len(self._slab):
            num_layers = min(self.layers_per_slab, self.num_layers - layer)
            self._slab = torch.empty((num_layers, *self.layer_shape), dtype=self.dtype, device=self.device)
            self._first = layer
        return self._slab[layer - self._first]
