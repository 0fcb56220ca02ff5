"""The decode node's settings (flags and PDSERVE_* variables); importing this is cheap."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.service.registry_config import RegistryConfig


@dataclass(frozen=True)
class DecodeNodeConfig(RegistryConfig):
    host: str = "127.0.0.1"
    port: int = 50071
    metrics_port: int = 9402
    kv_host: str = "127.0.0.1"  # the interface the KV receiver binds to
    kv_port: int = 50081
    kv_advertise_host: str | None = None  # what prefill nodes dial (default: kv_host)
    reservation_timeout_s: float = 30.0
    kv_connector: str = "tcp"  # what tickets ask prefill nodes to send with: tcp | nccl
    drain_timeout_s: float = 30.0
    ready_file: str | None = None
