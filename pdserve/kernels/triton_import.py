"""Triton, or where it is not installed, a stand-in that lets this package's files import.

torch's CPU wheels bring no Triton, and a CPU engine runs each kernel file's pure-torch
reference (`*_ref`), never a kernel. So the kernel files take `triton` and `tl` from here: with
Triton installed they are Triton itself; without it `@triton.jit` still defines each kernel,
and launching one says that Triton is needed.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError:
    class _Unlaunchable:
        """A kernel defined without Triton: subscripting it for a launch raises."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise ModuleNotFoundError(f"{self.fn.__name__} is a Triton kernel and Triton is not "
                                      "installed (pip install triton; it needs a GPU)")

    class _TritonStandIn:
        def jit(self, fn=None, **options):
            return _Unlaunchable(fn) if fn is not None else _Unlaunchable

        def __getattr__(self, name):
            raise ModuleNotFoundError(f"triton.{name}: Triton is not installed")

    triton = tl = _TritonStandIn()

__all__ = ["triton", "tl"]
