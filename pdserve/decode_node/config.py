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
    # a reservation whose KV has not begun to arrive by then is freed; long, since the prompt
    # may queue on its prefill node meanwhile (a router that goes away cancels it at once)
    reservation_timeout_s: float = 600.0
    kv_transfer_timeout_s: float = 30.0  # from a transfer's first bytes until it has landed
    max_queued_requests: int = 256  # the admission queue's bound: past it, RESOURCE_EXHAUSTED
    # what tickets ask prefill nodes to send with: tcp | nccl | ipc (on this host, in place; else tcp)
    kv_connector: str = "tcp"
    device_turns: str = "prefill-first"  # with a prefill and a decode node on one device: prefill-first | off
    drain_timeout_s: float = 30.0
    ready_file: str | None = None
