"""A decode node's KV pool as another process on the same host can open it: the `ipc`
connector's sender writes a transfer's blocks into it in place (ipc_sender.py), with no socket,
host copy or checksum on the way.

The pool is `pool_rows` (engine/kv_pool.py): `[num_layers * 2 * num_blocks, block_numel]`. Its
descriptor, which travels in the ticket (`KVTicket.ipc`, signed with it), is JSON, never
pickle:

- CUDA: the pool's CUDA IPC handle, as torch.multiprocessing shares CUDA tensors
  (engine/private_apis.py), and the GPU's UUID. A sender opens it only on that same GPU.
- CPU: a memfd that the pool lives in (engine/kv_pool.py `allocate_kv_caches(shared=True)`),
  opened through `/proc/<pid>/fd/<fd>` after its name, which carries a random token, is checked:
  in another pid namespace that path names some other process's file.

Both name the host by its boot id. Whatever cannot be opened (another host, another GPU, a
platform without these) is None, and the sender sends that transfer over TCP instead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from functools import cache

import torch

from pdserve.engine.kv_pool import shared_memfd
from pdserve.engine.private_apis import open_cuda_tensor, share_cuda_tensor

log = logging.getLogger(__name__)

VERSION = 1
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # a ticket's dtype


@cache
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def describe(rows: torch.Tensor) -> bytes:
    """The descriptor of pool rows `rows` for a same-host peer, or b"" when they cannot be
    shared (a CPU pool not in a memfd, a CUDA allocation torch cannot export)."""
    base = {"v": VERSION, "boot_id": boot_id(), "shape": list(rows.shape),
            "dtype": str(rows.dtype).removeprefix("torch.")}
    if not base["boot_id"] or not rows.is_contiguous():
        return b""
    if rows.device.type == "cuda":
        shared = share_cuda_tensor(rows)
        if shared is None:
            return b""
        return json.dumps({**base, "kind": "cuda", "gpu": gpu_uuid(rows.device), **shared}).encode()
    memfd = shared_memfd(rows)
    if memfd is None:
        return b""
    fd, name, offset = memfd
    return json.dumps({**base, "kind": "memfd", "pid": os.getpid(), "fd": fd, "name": name,
                       "offset": offset}).encode()


class SharedPools:
    """The pools of decode nodes that this process opened, one per KV endpoint, each opened
    once (a CUDA handle is costly to open). A mapping keeps its pool's memory alive even after
    the decode node died, so a pool is dropped when its endpoint names another one (the node
    restarted) and when the connection to it ends (`forget`); transfers under way hold their own
    reference."""

    def __init__(self, device: torch.device):
        self.device = device
        self._opened: dict[str, tuple[bytes, torch.Tensor | None]] = {}  # endpoint -> (descriptor, rows)
        self._lock = threading.Lock()

    def open(self, endpoint: str, descriptor: bytes) -> torch.Tensor | None:
        """The pool rows `descriptor` names, opened here, or None where this process cannot
        write them in place."""
        if not descriptor:
            return None
        with self._lock:
            opened = self._opened.get(endpoint)
            if opened is None or opened[0] != descriptor:
                opened = self._opened[endpoint] = (descriptor, self._open(descriptor))
            return opened[1]

    def forget(self, endpoint: str) -> None:
        with self._lock:
            self._opened.pop(endpoint, None)

    def __contains__(self, endpoint: str) -> bool:
        with self._lock:
            return endpoint in self._opened

    def _open(self, descriptor: bytes) -> torch.Tensor | None:
        try:
            d = json.loads(descriptor)
            if d.get("v") != VERSION or d.get("boot_id") != boot_id() or d.get("dtype") not in TORCH_DTYPES:
                return None
            if d["kind"] == "cuda" and self.device.type == "cuda" and d["gpu"] == gpu_uuid(self.device):
                rows = open_cuda_tensor(d, TORCH_DTYPES[d["dtype"]], self.device)
            elif d["kind"] == "memfd" and self.device.type == "cpu":
                rows = _open_memfd(d)
            else:
                return None
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
            log.warning("kv pool of a decode node on this host could not be opened (%s): sending over TCP", e)
            return None
        if rows is not None and list(rows.shape) != d["shape"]:
            return None
        return rows


def _open_memfd(d: dict) -> torch.Tensor | None:
    """The rows in another process's memfd, mapped shared, after its name is checked."""
    path = f"/proc/{int(d['pid'])}/fd/{int(d['fd'])}"
    if os.readlink(path) != f"/memfd:{d['name']} (deleted)":
        return None
    num_rows, row = d["shape"]
    dtype = TORCH_DTYPES[d["dtype"]]
    offset = int(d["offset"])
    flat = torch.from_file(path, shared=True, size=offset // dtype.itemsize + num_rows * row, dtype=dtype)
    return flat[offset // dtype.itemsize:].view(num_rows, row)
