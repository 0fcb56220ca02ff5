"""The private torch APIs and OS tricks that hot paths use, in one place, each with a public
fallback: a torch or platform without them runs the same code, only with more host time.

- `current_stream`: the calling thread's current CUDA stream from its raw handle (as Triton's
  launcher reads it) and a lookup, instead of `torch.cuda.current_stream`, which builds a new
  Stream object on every call (docs/architecture.md, "Measured figures behind the connectors").
- `tight_timer_slack`: Linux's prctl(PR_SET_TIMERSLACK) for the calling thread, so that the
  short sleeps of a polling loop end near their time instead of up to 50 us late.
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
