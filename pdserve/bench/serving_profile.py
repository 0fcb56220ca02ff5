"""Where a node's host time goes under load: py-spy (from the package index) samples the
process while one phase of benchmarks/serving.py runs; the summary lists the functions with
the most samples on top of the stack (self) and anywhere on it (total), over all threads."""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path


def start(pid: int, seconds: float, path: Path) -> subprocess.Popen:
    beside = Path(sys.executable).with_name("py-spy")  # a venv's, when it is not on PATH
    exe = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if exe is None:
        raise SystemExit("--profile-phase needs py-spy (pip install py-spy)")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
                             "--nonblocking", "--threads", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(path: Path, top: int = 20) -> str:
    """The folded stacks py-spy wrote, as two rankings of functions by share of samples."""
    own, anywhere, threads, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            anywhere[frame] += n
    if not total:
        return "py-spy recorded no samples"
    lines = [f"{total} samples; by thread: " + ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in threads.most_common(6)),
             "self  total  function"]
    for frame, n in own.most_common(top):
        lines.append(f"{100 * n / total:4.1f}% {100 * anywhere[frame] / total:5.1f}%  {frame}")
    return "\n".join(lines)
