"""Copies between host and GPU that do not make the host wait for the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory, which makes the host wait
until the GPU has finished everything queued before. A step launched while the previous one
still runs (async scheduling) must not wait, so small host inputs go through pinned memory
and an asynchronous copy, in stream order (torch keeps the pinned block until it is done).
"""

from __future__ import annotations

import torch

from .private_apis import current_stream


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, nested lists or a numpy array) as a tensor on `device`, without a host
    sync. A numpy array of `dtype` is not copied on the host: on CPU the tensor shares it."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor):
    """A host copy of `tensor` taken in stream order (pinned, asynchronous), and `ready()`,
    which blocks until it is complete. A CPU tensor is its own copy."""
    if tensor.device.type != "cuda":
        return tensor.contiguous(), lambda: None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host, stream_event(tensor.device).synchronize


def stream_event(device: torch.device) -> "torch.cuda.Event":
    """An event after the work queued so far on the calling thread's current stream of CUDA
    `device`."""
    return current_stream(device).record_event()
