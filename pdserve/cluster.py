"""A local cluster of real processes on loopback: prefill and decode nodes, then the router.

`pdserve up` and the integration tests both use it. Every process binds port 0 (the router
may be given a fixed one) and reports its ports in a ready file once it is serving, so
nothing races for ports. Logs go to one file per process under `log_dir` (a restarted process
appends to its file: what led to the restart stays readable). The processes share
a cluster secret (service/cluster_auth.py), made here and handed over in their environment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .service.cluster_auth import ENV as CLUSTER_SECRET_ENV
from .service.cluster_auth import ClusterAuth
from .service.tls import Tls


@dataclass
class Process:
    name: str  # prefill-0, decode-1, router
    popen: subprocess.Popen
    ready_file: Path
    log_file: Path
    info: dict = field(default_factory=dict)  # from the ready file: port, metrics_port, kv_port, pid
    args: list[str] = field(default_factory=list)  # what it was started with (after the role)
    role: str = ""
    metadata: tuple = ()  # what a call to its services must carry: the cluster secret
    tls: Tls = field(default_factory=Tls)  # how it is dialled

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    def channel(self) -> grpc.Channel:
        """A (blocking) channel to its gRPC port."""
        return self.tls.channel(self.address, aio=False)

    def log_tail(self, num_lines: int = 20) -> str:
        lines = self.log_file.read_text(errors="replace").splitlines() if self.log_file.exists() else []
        return "\n".join(lines[-num_lines:])


class ClusterError(RuntimeError):
    pass


class Cluster:
    """`node_args` go to every node (engine flags), `prefill_args`/`decode_args`/`router_args`
    to those roles; `prefill_args` may be a list of lists, one per prefill node.

    `redis`: None, the router gets the nodes as flags and there is no prefix index; "local",
    start a redis-server (stopped with the cluster); or a URL. With Redis, the nodes register
    there and the router finds them there. `gateway_port` (0: any free port): also run the
    OpenAI HTTP gateway over the router; `gateway_env` adds to its environment (secrets such
    as PDSERVE_API_KEY go there: a command line is visible to every user of the machine).
    `cluster_secret`: shared by every process (default: a new random one). `api_key`: one or
    several comma-separated keys that the gateway and the router's gRPC API require.
    `num_routers`: routers over the same nodes (the gateway uses them all; `router` is the first)."""

    def __init__(self, model: str, num_prefill: int = 1, num_decode: int = 1, router_port: int = 0,
                 node_args: list[str] = (), prefill_args=(), decode_args=(), router_args=(),
                 log_dir: str | None = None, log_level: str = "INFO", redis: str | None = None,
                 gateway_port: int | None = None, gateway_args=(), gateway_env: dict[str, str] | None = None,
                 cluster_secret: str | None = None, api_key: str | None = None, num_routers: int = 1,
                 tls: Tls | None = None, base_port: int | None = None):
        if num_prefill < 0 or num_decode < 1:
            raise ValueError("a cluster needs at least one decode node (and no prefill node: aggregated serving)")
        self.model, self.num_prefill, self.num_decode = model, num_prefill, num_decode
        self.router_port = router_port
        self.base_port = base_port  # None: the nodes' ports are any free ones (see `node_ports`)
        self.node_args, self.router_args = list(node_args), list(router_args)
        self.prefill_args = _per_node(prefill_args, num_prefill)
        self.decode_args = _per_node(decode_args, num_decode)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pdserve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level
        self.redis, self.redis_url = redis, None if redis == "local" else redis
        self.local_redis = None
        self.gateway_port, self.gateway_args = gateway_port, list(gateway_args)
        self.gateway_env = dict(gateway_env or {})
        self.auth = ClusterAuth(cluster_secret or secrets.token_urlsafe(32))
        self.tls = tls if tls is not None else Tls.from_env()  # every component's (service/tls.py)
        self.api_key_env = {"PDSERVE_API_KEY": api_key} if api_key else {}  # router and gateway
        self.num_routers = num_routers
        self.gateway: Process | None = None
        self.prefill: list[Process] = []
        self.decode: list[Process] = []
        self.routers: list[Process] = []

    @property
    def processes(self) -> list[Process]:
        return self.prefill + self.decode + self.routers + [p for p in (self.gateway,) if p]

    @property
    def router(self) -> Process | None:
        return self.routers[0] if self.routers else None

    @property
    def router_address(self) -> str:
        return self.router.address

    @property
    def gateway_url(self) -> str:
        return f"{self.tls.scheme}://{self.gateway.address}/v1"

    def start(self, timeout: float = 300.0, progress=lambda message: None) -> "Cluster":
        try:
            if self.redis == "local":
                from .redis_local import LocalRedis
                self.local_redis = LocalRedis(str(self.log_dir / "redis")).start()
                self.redis_url = self.local_redis.url
                progress(f"redis-server ready at {self.redis_url}")
            registry = ["--redis-url", self.redis_url] if self.redis_url else []
            self.prefill = [self._spawn(f"prefill-{i}", "prefill", [
                "--model", self.model, *self.node_ports(i), *registry, *self.node_args, *self.prefill_args[i]])
                for i in range(self.num_prefill)]
            self.decode = [self._spawn(f"decode-{i}", "decode", [
                "--model", self.model, *self.node_ports(self.num_prefill + i, kv=True), *registry,
                *self.node_args, *self.decode_args[i]]) for i in range(self.num_decode)]
            progress(f"loading {self.model} on {self.num_prefill} prefill and {self.num_decode} decode "
                     f"node(s); logs in {self.log_dir}")
            self._wait_ready(self.prefill + self.decode, timeout, progress)
            nodes = registry or ["--prefill-nodes", ",".join(p.address for p in self.prefill),
                                 "--decode-nodes", ",".join(p.address for p in self.decode)]
            self.routers = [self._spawn("router" if i == 0 else f"router-{i}", "router", [
                "--model", self.model, "--port", str(self.router_port if i == 0 else 0),
                *self.router_metrics_port(i), *nodes, *self.router_args],
                self.api_key_env) for i in range(self.num_routers)]
            self._wait_ready(self.routers, timeout, progress)
            if self.gateway_port is not None:
                self.gateway = self._spawn("gateway", "gateway", [
                    "--router", ",".join(r.address for r in self.routers), "--port", str(self.gateway_port), *self.gateway_args],
                    {**self.api_key_env, **self.gateway_env})
                self._wait_ready([self.gateway], timeout, progress)
        except BaseException:
            self.stop()
            raise
        return self

    def node_ports(self, index: int, kv: bool = False) -> list[str]:
        """Node `index` (prefill nodes first) gets gRPC `base_port + 3 * index`, metrics the
        next port, and a decode node's KV receiver the one after; any free ones without a base."""
        if self.base_port is None:
            return ["--kv-port", "0"] if kv else []
        port = self.base_port + 3 * index
        return ["--port", str(port), "--metrics-port", str(port + 1), *(["--kv-port", str(port + 2)] if kv else [])]

    def router_metrics_port(self, index: int) -> list[str]:
        """Router `index`'s metrics port: the next after the nodes' (with a base port)."""
        if self.base_port is None:
            return []
        return ["--metrics-port", str(self.base_port + 3 * (self.num_prefill + self.num_decode) + index)]

    def endpoints(self) -> list[tuple[str, str]]:
        """(what, where) of every port the cluster listens on, for a banner."""
        rows = [(f"{p.name} gRPC", p.address) for p in self.routers + self.prefill + self.decode]
        rows += [(f"{p.name} KV", f"127.0.0.1:{p.info['kv_port']}") for p in self.decode]
        if self.gateway is not None:
            rows.append(("gateway HTTP (OpenAI API, /metrics)", self.gateway_url.removesuffix("/v1")))
        scheme = self.tls.scheme
        rows += [(f"{p.name} metrics", f"{scheme}://127.0.0.1:{p.info['metrics_port']}/metrics")
                 for p in self.routers + self.prefill + self.decode]
        return rows

    def _spawn(self, name: str, role: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        ready = self.log_dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log = self.log_dir / f"{name}.log"
        metrics = [] if role == "gateway" else ["--metrics-port", "0"]  # it serves /metrics itself
        cmd = [sys.executable, "-m", "pdserve.cli", role, "--host", "127.0.0.1", "--port", "0",
               *metrics, "--ready-file", str(ready), "--log-level", self.log_level, *args]
        with open(log, "a") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, CLUSTER_SECRET_ENV: self.auth.secret, **self.tls.env(),
                                          **(env or {})},
                                     start_new_session=True)
        return Process(name, popen, ready, log, args=list(args), role=role, metadata=self.auth.metadata,
                       tls=self.tls)

    def restart(self, name: str, timeout: float = 120.0) -> Process:
        """Kills a node (SIGKILL: no drain, no goodbye to Redis) and starts it again on the same
        gRPC port, as a crashed node that a supervisor restarts."""
        old = next(p for p in self.processes if p.name == name)
        if old.popen.poll() is None:
            old.popen.kill()
            old.popen.wait()
        new = self._spawn(name, old.role, [*old.args, "--port", str(old.info["port"])])
        group = self.prefill if old in self.prefill else self.decode
        group[group.index(old)] = new
        self._wait_ready([new], timeout, lambda message: None)
        return new

    def _wait_ready(self, processes: list[Process], timeout: float, progress) -> None:
        start, pending = time.monotonic(), list(processes)
        while pending:
            for p in list(pending):
                if p.ready_file.exists():
                    p.info = json.loads(p.ready_file.read_text())
                    pending.remove(p)
                    progress(f"{p.name} ready on {p.address} ({time.monotonic() - start:.1f}s)")
                elif p.popen.poll() is not None:
                    raise ClusterError(f"{p.name} exited with code {p.popen.returncode}:\n{p.log_tail()}")
            if pending and time.monotonic() - start > timeout:
                names = ", ".join(p.name for p in pending)
                raise ClusterError(f"{names} not ready after {timeout:.0f}s:\n{pending[0].log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful drain), then SIGKILL whatever is left after `timeout`."""
        for p in reversed(self.processes):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self.local_redis is not None:
            self.local_redis.stop()

    def __enter__(self) -> "Cluster":
        return self.start() if not self.processes else self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and exc_type is not KeyboardInterrupt:  # say what the nodes saw
            for p in self.processes:
                print(f"--- {p.name}: last lines of {p.log_file}\n{p.log_tail(30)}", file=sys.stderr)
        self.stop()


def _per_node(args, count: int) -> list[list[str]]:
    args = list(args)
    if args and isinstance(args[0], (list, tuple)):
        if len(args) != count:
            raise ValueError(f"{len(args)} argument lists for {count} nodes")
        return [list(a) for a in args]
    return [args] * count
