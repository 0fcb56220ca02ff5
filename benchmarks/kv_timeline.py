"""Diagnostics for benchmarks/kv_connectors.py --timeline: spies that note when the nccl
connector's posting threads took, posted and finished each group and how long each step took,
and CUDA timing events mapped to the host clock for when its bytes were joined and landed."""

from __future__ import annotations

import sys
import time

import torch


def timeline(cls, name: str, marks: list, device_times: bool = False) -> list:
    """Appends (time.monotonic(), layers, seconds in the call, device time) to `marks` after
    each call of cls.name from now on. With `device_times` (CUDA, a ProcessGroupPair's
    method), an event for when the pair's stream got past the call's work (a receive: its
    bytes landed; a send: the join before it; the send itself is not on that stream), which
    `DeviceClock.device_times` turns into a time.monotonic()."""
    method = getattr(cls, name)

    def spy(self, items):
        start = time.monotonic()
        method(self, items)
        end, event = time.monotonic(), None
        if device_times and getattr(self, "stream", None) is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
        marks.append((end, len(items), end - start, event))
    setattr(cls, name, spy)
    return marks


def busy(owner, names: list[str], totals: dict) -> dict:
    """Adds the seconds spent in each owner.name call (a class's method or a module's
    function) to totals[name] from now on, and keeps the longest call's in totals[name max]."""
    for name in names:
        method = getattr(owner, name)

        def spy(*args, _method=method, _name=name, **kwargs):
            start = time.monotonic()
            try:
                return _method(*args, **kwargs)
            finally:
                seconds = time.monotonic() - start
                totals[_name] = totals.get(_name, 0.0) + seconds
                totals[f"{_name} max"] = max(totals.get(f"{_name} max", 0.0), seconds)
        setattr(owner, name, spy)
    return totals


class DeviceClock:
    """Maps CUDA timing events to time.monotonic(): an event recorded, waited for, and the
    host time right after it (within a few us)."""

    def __init__(self, device):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record(torch.cuda.current_stream(device))
        self.event.synchronize()
        self.host = time.monotonic()

    def device_times(self, marks: list) -> list:
        """`marks` with each event as its time.monotonic() (None without one); waits for them."""
        out = []
        for end, n, seconds, event in marks:
            if event is not None:
                event.synchronize()
                event = self.host + 1e-3 * self.event.elapsed_time(event)
            out.append((end, n, seconds, event))
        return out


def print_timeline(start: float, handed_over: list[float], reply: dict, sent: list, sent_nccl: list,
                   sender_steps: dict) -> None:
    """In ms from the first hand-over: when each hand-over call (each send_layers, then the
    finishes) returned; then one line a group: on the sender, when its thread took the group,
    posted the send, the post returned, and the thread returned, and when the device had joined
    its bytes; on the receiver, when its thread read the GROUP frame, posted the receive, the
    post returned, and the thread returned, and when the bytes landed."""
    ms = lambda t: f"{1e3 * (t - start):7.2f}" if t is not None else "      -"  # noqa: E731
    spent = lambda steps: ", ".join(f"{k} {1e3 * v:.2f}" for k, v in steps.items())  # noqa: E731
    print(f"  switch interval {1e3 * sys.getswitchinterval():.2f} ms (receiver "
          f"{1e3 * reply['switch interval']:.2f}); handed over by {ms(handed_over[-1])} ms; "
          f"done {ms(reply['done'])} ms\n"
          f"  calls returned at ms: {' '.join(f'{1e3 * (t - start):.2f}' for t in handed_over)}\n"
          f"  busy ms: sender {1e3 * sum(m[2] for m in sent):.2f} (send_many {1e3 * sum(m[2] for m in sent_nccl):.2f}, "
          f"{spent(sender_steps)}); receiver {1e3 * sum(m[2] for m in reply['posted']):.2f} (recv_many "
          f"{1e3 * sum(m[2] for m in reply['received']):.2f}, {spent(reply['steps'])})\n"
          "  group layers | sender: took  posted  sent  returned  joined | receiver: read  posted  received  returned  landed",
          file=sys.stderr)
    for (end, n, took, _), (send_end, _, send_took, joined), (recv_end, _, recv_took), (got, _, got_took, landed) in \
            zip(sent, sent_nccl, reply["posted"], reply["received"]):
        print(f"  {n:12d} | {ms(end - took)} {ms(send_end - send_took)} {ms(send_end)} {ms(end)} {ms(joined)} | "
              f"{ms(recv_end - recv_took)} {ms(got - got_took)} {ms(got)} {ms(recv_end)} {ms(landed)}", file=sys.stderr)
