"""Turns between a prefill node and a decode node on one device (engine/device_turns.py), between
real processes: a prefill step in another process holds a decode step back until it ends, a
waiting decode node gets its step before the next prefill step, a dead node holds the other
back no longer than its mark, and its slot is cleaned up."""

import os
import signal
import subprocess
import sys
import textwrap
import struct
import threading
import time
import uuid

import pytest

from pdserve.engine import device_turns
from pdserve.engine.device_turns import DeviceTurns, check_device_turns, slot_path

# A node in another process: each line on stdin starts ("step") or ends ("end") its one step,
# which it reports; "quit" closes it.
NODE = textwrap.dedent("""
    import sys, threading
    from pdserve.engine import device_turns
    device_turns.MAX_MARK_S = float(sys.argv[3])
    turns = device_turns.DeviceTurns(sys.argv[1], sys.argv[2])
    print("ready", flush=True)
    go_on = threading.Event()
    def step():
        print("running", flush=True)
        go_on.wait()
        go_on.clear()
        return []
    stepping = None
    for line in sys.stdin:
        if line.strip() == "step":
            stepping = threading.Thread(target=turns.around(step))
            stepping.start()
        elif line.strip() == "end":
            go_on.set()
            stepping.join()
            print("ended", flush=True)
        else:
            break
    turns.close()
""")


class Node:
    def __init__(self, key: str, role: str, max_mark_s: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-c", NODE, key, role, str(max_mark_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.path = slot_path(key, role, self.proc.pid)
        assert self.read() == "ready"

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> str:
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.say("quit")
            self.proc.wait(30)


class Stepping:
    """A step of this process's `turns` on a thread: `started` is set once the step runs."""

    def __init__(self, turns: DeviceTurns):
        self.started, self.finish = threading.Event(), threading.Event()

        def step():
            self.started.set()
            self.finish.wait(60)
            return []
        self.thread = threading.Thread(target=turns.around(step), daemon=True)
        self.thread.start()

    def end(self) -> None:
        self.finish.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def slot_field(path: str, offset: int) -> float:
    with open(path, "rb") as f:
        return struct.unpack_from("d", f.read(), offset)[0]


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def key():
    return f"test-{uuid.uuid4()}"


def test_a_decode_step_waits_for_the_prefill_step_of_another_process(key):
    decode = DeviceTurns(key, "decode")
    prefill = Node(key, "prefill")
    try:
        prefill.say("step")
        assert prefill.read() == "running"
        step = Stepping(decode)
        assert not step.started.wait(0.5)  # the prefill mark holds two minutes: only its end lets it go
        prefill.say("end")
        assert prefill.read() == "ended"
        assert step.started.wait(30)
        step.end()
        assert decode.num_waits == 1
    finally:
        prefill.close()
        decode.close()
    assert not os.path.exists(prefill.path) and not os.path.exists(decode.path)


def test_a_prefill_step_waits_for_the_decode_step_in_flight(key):
    prefill = DeviceTurns(key, "prefill")
    decode = Node(key, "decode")
    try:
        decode.say("step")
        assert decode.read() == "running"
        step = Stepping(prefill)
        assert not step.started.wait(0.5)
        decode.say("end")
        assert decode.read() == "ended"
        assert step.started.wait(30)
        step.end()
    finally:
        decode.close()
        prefill.close()


def test_a_waiting_decode_node_steps_before_the_next_prefill_step(key):
    """Prefill first, but never prefill only: back-to-back prefill steps let a decode node that
    waits run one step in between."""
    prefill = DeviceTurns(key, "prefill")
    decode = Node(key, "decode")
    try:
        first = Stepping(prefill)
        assert first.started.wait(30)
        decode.say("step")  # waits behind the prefill step
        assert wait_for(lambda: slot_field(decode.path, device_turns.WAITING) == 1.0)
        first.end()
        assert decode.read() == "running"
        second = Stepping(prefill)
        assert not second.started.wait(0.5)  # the decode step in between runs first
        decode.say("end")
        assert decode.read() == "ended"
        assert second.started.wait(30)
        second.end()
    finally:
        decode.close()
        prefill.close()


def test_a_dead_prefill_node_holds_decode_back_no_longer_than_its_mark(key, monkeypatch):
    monkeypatch.setattr(device_turns, "RESCAN_S", 600.0)  # the mark's end, not a rescan, lets it go
    decode = DeviceTurns(key, "decode")
    prefill = Node(key, "prefill", max_mark_s=3.0)
    try:
        prefill.say("step")
        assert prefill.read() == "running"
        decode._others.rescan(time.monotonic())  # sees the live node's slot; no other look until the end
        os.kill(prefill.proc.pid, signal.SIGKILL)
        prefill.proc.wait(30)
        step = Stepping(decode)
        assert step.started.wait(30)
        step.end()
        assert decode.num_waits == 1 and os.path.exists(prefill.path)  # nobody closed it
        decode._others.rescan(float("inf"))
        assert not os.path.exists(prefill.path)  # its process is gone: the slot goes
    finally:
        prefill.proc.kill()
        decode.close()


def test_alone_no_wait(key):
    decode = DeviceTurns(key, "decode")
    step = Stepping(decode)
    assert step.started.wait(30)
    step.end()
    assert decode.num_waits == 0
    decode.close()


def test_device_turns_values():
    check_device_turns("prefill-first")
    check_device_turns("off")
    with pytest.raises(ValueError, match="--device-turns must be one of"):
        check_device_turns("decode-first")
