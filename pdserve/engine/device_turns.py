"""Turns between a prefill node and a decode node that share a GPU: their steps run one at a
time, prefill first, as one engine orders its work.

Two processes on one GPU (no MPS) time-slice it: a prefill step that runs beside back-to-back
decode steps gets about half the GPU, so a prompt's first token comes about twice as late as
in one engine, where a step runs its prefill chunk with the decodes and nothing beside it.
Turns give the two processes that order back.

Each node has a slot of its own: 24 bytes of shared memory in `/dev/shm`, named by the GPU's
UUID (`device_key`), its role and its pid, mode 0600 (only processes of the same user see it). A slot holds a mark (a CLOCK_MONOTONIC time until which the node's step
may run; 0 when none runs), whether the node waits for a turn, and its count of steps.

* A prefill node first lets each waiting decode node run one step, then marks, waits until
  no decode mark holds (the decode step in flight ends), runs, and clears its mark.
* A decode node waits (flagged as waiting) while a prefill mark holds, marks, and clears
  again if a prefill mark came meanwhile (prefill first); then runs and clears.

So steps alternate under load (decode is never starved: it gets a step between two prefill
steps), and a prompt waits for at most the decode step in flight. On CUDA a decode step's
mark spans the host's call, while the GPU may still run the step launched ahead (async
scheduling): the two overlap by at most that step. A mark reaches at most `MAX_MARK_S`
ahead and a waiting node looks again for nodes that came or went every `RESCAN_S`, removing
the slots of processes that died: a node that dies mid-step holds the other back for about a
second. A slow step that outlives its mark only lets the other node in early. Both nodes read
the same clock and the same /dev/shm: turns work between processes of one host (one pod).
"""

from __future__ import annotations

import glob
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable

import torch

MAX_MARK_S = 5.0  # the longest a live node's mark holds the other node back
RESCAN_S = 1.0  # how often a waiting node looks for nodes that came or went
POLL_S = 100e-6  # a waiting node's look at the slots
DEVICE_TURNS = ("prefill-first", "off")
_SLOT = struct.Struct("ddd")  # mark (busy until), waiting (0 or 1), num_steps
MARK, WAITING, NUM_STEPS = 0, 8, 16  # byte offsets of the fields


def check_device_turns(value: str) -> None:
    if value not in DEVICE_TURNS:
        raise ValueError(f"--device-turns must be one of {', '.join(DEVICE_TURNS)}, got {value!r}")


def device_key(device: torch.device) -> str | None:
    """What names a GPU across processes (their CUDA device indexes may differ); None where
    nodes take no turns: on CPU each node has its own part of the cores (`pdserve up`), and
    turns with every core each measured no better (docs/architecture.md)."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_properties(device).uuid)
    return None


def _folder() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def slot_path(key: str, role: str, pid: int) -> str:
    return os.path.join(_folder(), f"pdserve-turns-{key}-{role}-{pid}")


class DeviceTurns:
    """One node's turns: `around(step)` is its step, taken in turn. `role`: prefill | decode."""

    def __init__(self, key: str, role: str):
        assert role in ("prefill", "decode"), role
        self.role = role
        self.path = slot_path(key, role, os.getpid())
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _SLOT.size)
            self._slot = mmap.mmap(fd, _SLOT.size)
        finally:
            os.close(fd)
        self._others = _Slots(slot_path(key, "decode" if role == "prefill" else "prefill", "*"))
        self.num_steps = 0
        self.num_waits = 0
        self.waited_s = 0.0

    def around(self, step: Callable[[], list]) -> Callable[[], list]:
        take = self._take_prefill_turn if self.role == "prefill" else self._take_decode_turn

        def step_in_turn() -> list:
            take()
            try:
                return step()
            finally:
                self.num_steps += 1
                _put(self._slot, NUM_STEPS, self.num_steps)
                _put(self._slot, MARK, 0.0)
        return step_in_turn

    def _take_prefill_turn(self) -> None:
        waiting = self._others.waiting()
        if waiting:  # each decode node that waits for a turn gets one first
            self._wait(lambda: any(self._others.field(path, WAITING) and self._others.field(path, NUM_STEPS) == num
                                   for path, num in waiting.items()))
        _put(self._slot, MARK, time.monotonic() + MAX_MARK_S)
        self._wait(self._others.marked)

    def _take_decode_turn(self) -> None:
        while True:
            if self._others.marked():
                _put(self._slot, WAITING, 1.0)
                self._wait(self._others.marked)
            _put(self._slot, MARK, time.monotonic() + MAX_MARK_S)
            if not self._others.marked():  # no prefill step began meanwhile: this turn is ours
                _put(self._slot, WAITING, 0.0)
                return
            _put(self._slot, MARK, 0.0)  # one did: it goes first

    def _wait(self, blocked: Callable[[], bool]) -> None:
        """Until `blocked()` is false; the other nodes' marks bound how long."""
        start = now = time.monotonic()
        if not blocked():
            return
        self.num_waits += 1
        while blocked():
            time.sleep(POLL_S)
            now = time.monotonic()
            self._others.rescan(now)
        self.waited_s += now - start

    def close(self) -> None:
        _put(self._slot, MARK, 0.0)
        _put(self._slot, WAITING, 0.0)
        self._slot.close()
        self._others.close()
        _remove(self.path)


class _Slots:
    """The other role's slots on this device, read-only; looked for again every `RESCAN_S`."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._maps: dict[str, mmap.mmap] = {}
        self._next_scan = 0.0

    def marked(self) -> bool:
        now = time.monotonic()
        self.rescan(now)
        return any(_get(m, MARK) > now for m in self._maps.values())

    def waiting(self) -> dict[str, float]:
        """The nodes that wait for a turn, with their step counts."""
        self.rescan(time.monotonic())
        return {path: _get(m, NUM_STEPS) for path, m in self._maps.items() if _get(m, WAITING)}

    def field(self, path: str, offset: int) -> float:
        m = self._maps.get(path)
        return 0.0 if m is None else _get(m, offset)  # a node that went waits for nothing

    def rescan(self, now: float) -> None:
        if now < self._next_scan:
            return
        self._next_scan = now + RESCAN_S
        paths = set()
        for path in glob.glob(self.pattern):
            if _alive(path):
                paths.add(path)
            else:
                _remove(path)  # its process died without closing
        for path in set(self._maps) - paths:
            self._maps.pop(path).close()
        for path in paths - set(self._maps):
            try:
                with open(path, "rb") as f:
                    self._maps[path] = mmap.mmap(f.fileno(), _SLOT.size, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # another user's, or not sized yet
                pass

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


_FIELD = struct.Struct("d")


def _put(m: mmap.mmap, offset: int, value: float) -> None:
    _FIELD.pack_into(m, offset, value)


def _get(m: mmap.mmap, offset: int) -> float:
    return _FIELD.unpack_from(m, offset)[0]


def _alive(path: str) -> bool:
    try:
        os.kill(int(path.rsplit("-", 1)[1]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        pass  # another user's process, or a name we did not write
    return True


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
