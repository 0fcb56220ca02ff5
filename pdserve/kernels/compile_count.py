"""How many compiled variants this package's Triton kernels have: a launch that compiles
makes it grow, so a steady state (CUDA graphs replaying, prefills of any length) keeps it
flat. 0 in the Triton interpreter, which compiles nothing."""

from __future__ import annotations

import triton


def num_compiled_kernels() -> int:
    from . import paged_decode_attention, prefill_attention, store_kv
    total = 0
    for module in (paged_decode_attention, prefill_attention, store_kv):
        for obj in vars(module).values():
            caches = getattr(obj, "device_caches", None)
            if isinstance(obj, triton.runtime.JITFunction) and caches is not None:
                total += sum(len(entry[0]) for entry in caches.values())  # entry[0]: kernel cache
    return total
