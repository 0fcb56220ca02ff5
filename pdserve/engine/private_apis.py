"""The private torch APIs and OS tricks that hot paths use, in one place, each with a public
fallback: a torch or platform without them runs the same code, only with more host time.

- `current_stream`: the calling thread's current CUDA stream from its raw handle (as Triton's
  launcher reads it) and a lookup, instead of `torch.cuda.current_stream`, which builds a new
  Stream object on every call (docs/architecture.md, "Measured figures behind the connectors").
- `tight_timer_slack`: Linux's prctl(PR_SET_TIMERSLACK) for the calling thread, so that the
  short sleeps of a polling loop end near their time instead of up to 50 us late.
- `share_cuda_tensor` / `open_cuda_tensor`: a CUDA tensor shared with another process through
  CUDA IPC, as torch.multiprocessing does it (its storage's `_share_cuda_`, and
  `rebuild_cuda_tensor`), but as plain fields (no pickle); where torch lacks them, None, and
  the caller does without (the `ipc` connector then sends over TCP).
"""

from __future__ import annotations

import ctypes

import torch

_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}  # (device index, raw handle) -> stream
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device: torch.device) -> "torch.cuda.Stream":
    """The calling thread's current stream on CUDA `device`, as `torch.cuda.current_stream`
    gives it. Stream objects of one handle are interchangeable; torch never frees its pool's
    streams, so a cached one stays valid."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if _raw_stream is None:
        return torch.cuda.current_stream(index)
    key = (index, _raw_stream(index))
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = torch.cuda.current_stream(index)
    return stream


def tight_timer_slack() -> None:
    """Linux: the calling thread's sleeps end within about a microsecond of their time instead
    of Linux's default 50 us timer slack, which doubles a 50 us sleep. Elsewhere nothing
    changes."""
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in ns
    except (OSError, AttributeError):  # no libc prctl: not Linux
        pass


def share_cuda_tensor(tensor: torch.Tensor) -> dict | None:
    """The fields another process needs to open `tensor` (contiguous, on CUDA) in place, as
    JSON takes them; None where torch cannot share it (e.g. expandable segments)."""
    try:
        from torch.multiprocessing.reductions import reduce_tensor

        _, args = reduce_tensor(tensor)
        (_, size, stride, offset, _, _, device, handle, size_bytes, offset_bytes, _,
         ref_counter_handle, ref_counter_offset, event_handle, event_sync_required) = args
    except (ImportError, RuntimeError, TypeError, ValueError):
        return None
    return {"size": list(size), "stride": list(stride), "offset": offset, "device": device,
            "handle": handle.hex(), "size_bytes": size_bytes, "offset_bytes": offset_bytes,
            "ref_counter_handle": ref_counter_handle.hex(), "ref_counter_offset": ref_counter_offset,
            "event_handle": (event_handle or b"").hex(), "event_sync_required": bool(event_sync_required)}


def open_cuda_tensor(fields: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The tensor `share_cuda_tensor` described, opened in this process on `device` (the same
    GPU: the caller checks its UUID); None where torch cannot."""
    try:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        return rebuild_cuda_tensor(
            torch.Tensor, tuple(fields["size"]), tuple(fields["stride"]), int(fields["offset"]), torch.UntypedStorage,
            dtype, device.index if device.index is not None else torch.cuda.current_device(),
            bytes.fromhex(fields["handle"]), int(fields["size_bytes"]), int(fields["offset_bytes"]), False,
            bytes.fromhex(fields["ref_counter_handle"]), int(fields["ref_counter_offset"]),
            bytes.fromhex(fields["event_handle"]) or None, bool(fields["event_sync_required"]))
    except (ImportError, RuntimeError, TypeError, ValueError, KeyError):
        return None
