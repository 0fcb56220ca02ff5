"""The life of a pdserve gRPC service: a grpc.aio server with health checking (NOT_SERVING
until the service is loaded and while it drains), reflection, Prometheus /metrics, a ready
file for launchers, and a graceful stop on SIGTERM or SIGINT: health turns NOT_SERVING, new
RPCs are refused, running ones get `drain_timeout_s` to finish. Every call of our services
passes a `CallGuard` (service/call_guard.py): by default, the cluster secret of `auth`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import CollectorRegistry

from pdserve.protos import pdserve_pb2

from .call_guard import ANSWERED, Authenticate, CallGuard
from .cluster_auth import ClusterAuth, check_exposure
from .metrics import start_metrics_server
from .tls import Tls

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # a prompt of token ids stays far below this
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    def __init__(self, service_name: str, host: str, port: int, metrics_port: int | None,
                 drain_timeout_s: float = 30.0, auth: ClusterAuth | None = None,
                 authenticate: Authenticate | None = None, tls: Tls | None = None,
                 metrics_registry: CollectorRegistry | None = None):
        """`authenticate` (method, metadata) -> why a call is refused, or None; by default a call
        must carry `auth`'s cluster secret. `tls` (default: from the environment) for every port;
        `metrics_registry`: what /metrics serves (service/metrics.py `role_registry`)."""
        self.service_name = service_name  # e.g. "pdserve.v1.DecodeService"
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.auth = auth if auth is not None else ClusterAuth.from_env()
        check_exposure(host, self.auth, service_name)
        self.tls = tls if tls is not None else Tls.from_env()
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.grpc = grpc.aio.server(interceptors=[CallGuard(authenticate or self._member_only)], options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                             ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                             ("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (service_name, reflection.SERVICE_NAME, health.SERVICE_NAME), self.grpc)
        self._stop = asyncio.Event()

    def _member_only(self, method: str, metadata) -> str | None:
        return None if self.auth.admits(metadata) else "this service takes calls from cluster members only"

    async def start(self) -> None:
        """Binds (port 0: any free port), starts serving, health NOT_SERVING until `set_serving`."""
        await self.set_serving(False)
        self.port = self.tls.add_port(self.grpc, f"{self.host}:{self.port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port on {self.host}")
        await self.grpc.start()
        if self.metrics_port is not None:
            self.metrics_port = start_metrics_server(self.host, self.metrics_port, self.metrics_registry, self.tls)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("%s listening on %s:%d (metrics on %s, %s)", self.service_name, self.host, self.port,
                 self.metrics_port, "TLS" if self.tls.serves else "plain text")

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving and not self.draining else NOT_SERVING
        for name in ("", self.service_name):
            await self.health.set(name, status)

    def write_ready_file(self, path: str | None, **info) -> None:
        """Tells a launcher (`pdserve up`, tests) the bound ports once the service is loaded."""
        write_ready(path, host=self.host, port=self.port, metrics_port=self.metrics_port, **info)

    async def wait_and_drain(self, active: Callable[[], int] = lambda: 0) -> None:
        """Returns after SIGTERM/SIGINT and a graceful stop: health turns NOT_SERVING (and
        still answers), the service refuses new work, and its `active()` requests get up to
        `drain_timeout_s` to finish before the server stops."""
        await self._stop.wait()
        log.info("%s: draining %d requests (up to %.0fs)", self.service_name, active(), self.drain_timeout_s)
        self.draining = True
        await self.set_serving(False)
        deadline = asyncio.get_running_loop().time() + self.drain_timeout_s
        while active() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.grpc.stop(1.0)
        log.info("%s: stopped", self.service_name)

    def request_stop(self) -> None:
        self._stop.set()


class Drainable:
    """What a node servicer tells its Server: `active` request ids (the drain waits for them)
    and whether the server is draining (new work is refused)."""

    def __init__(self):
        self.server: Server | None = None  # set by the node
        self.active: set[str] = set()  # request ids with a call open

    @property
    def draining(self) -> bool:
        return self.server is not None and self.server.draining

    def num_active(self) -> int:
        return len(self.active)


def write_ready(path: str | None, **info) -> None:
    """Writes `info` and the pid as JSON to `path` atomically (nothing without a path)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), **info}, f)
    os.replace(tmp, path)


def service_name(servicer_module_name: str) -> str:
    return pdserve_pb2.DESCRIPTOR.services_by_name[servicer_module_name].full_name


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str):
    """Ends the RPC with a status; logs it so the node says what happened to which request."""
    log.info("%s: %s", code.name, message)
    await context.abort(code, message, trailing_metadata=ANSWERED)
