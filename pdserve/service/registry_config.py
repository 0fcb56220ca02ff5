"""A node's Redis and tracing settings (prefill and decode node configs extend them); torch-
and redis-free, so that the CLI reads them without importing a service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryConfig:
    """What prefill and decode node configs share: Redis, and where traces go."""

    redis_url: str | None = None  # register here (and, prefill, publish the prefix cache)
    advertise_host: str | None = None  # the host routers dial for gRPC (default: the bind host)
    node_id: str | None = None  # default: <role>-<advertise host>:<port>
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    otlp_endpoint: str | None = None  # OpenTelemetry traces to this OTLP/gRPC collector (service/tracing.py)
