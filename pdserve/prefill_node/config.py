"""The prefill node's settings (flags and PDSERVE_* variables); importing this is cheap."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.service.registry_config import RegistryConfig


@dataclass(frozen=True)
class PrefillNodeConfig(RegistryConfig):
    host: str = "127.0.0.1"
    port: int = 50061
    metrics_port: int = 9401
    kv_connect_timeout_s: float = 5.0
    kv_transfer_timeout_s: float = 30.0
    device_turns: str = "prefill-first"  # with a prefill and a decode node on one device: prefill-first | off
    drain_timeout_s: float = 30.0
    ready_file: str | None = None
    kv_test_corrupt_transfers: int = 0  # test hook: corrupt the first N transfers' payloads
    kv_test_hold_prefill_s: float = 0.0  # test hook: each prompt waits this long first (as if queued)
