"""`pdserve decode`: loads the engine, opens the KV receiver, serves DecodeService."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from engine.config import EngineConfig
from protos import pdserve_pb2_grpc as pb_grpc
from service import metrics
from service.node_registration import RegistryConfig, register
from service.server import Server, service_name

from .service import DecodeServicer

log = logging.getLogger(__name__)


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


async def serve(engine_config: EngineConfig, config: DecodeNodeConfig) -> None:
    from engine.engine import Engine
    from engine.engine_loop import EngineLoop
    from kv_transfer.senders import CONNECTORS
    from kv_transfer.tcp import TcpKVReceiver

    if config.kv_connector not in CONNECTORS:
        raise ValueError(f"--kv-connector must be one of {', '.join(CONNECTORS)}, got {config.kv_connector!r}")

    server = Server(service_name("DecodeService"), config.host, config.port, config.metrics_port,
                    config.drain_timeout_s)
    servicer = DecodeServicer(config.reservation_timeout_s, config.kv_connector)
    servicer.server = server
    pb_grpc.add_DecodeServiceServicer_to_server(servicer, server.grpc)
    await server.start()  # health answers NOT_SERVING while the model loads
    engine = await asyncio.to_thread(Engine, engine_config)
    receiver = TcpKVReceiver(engine.runner.kv_caches, config.kv_host, config.kv_port,
                             config.kv_advertise_host, pair_timeout=config.reservation_timeout_s)
    registration = None

    def after_step(stats: dict) -> None:
        metrics.update_engine_gauges(stats)
        if registration is not None:
            registration.update_load(stats)

    loop = EngineLoop(engine, after_step=after_step)
    servicer.attach(loop, receiver)
    loop.start()
    registration = await register(config, "decode", config.host, server.port, engine.fingerprint)
    after_step(engine.stats())
    await server.set_serving(True)
    server.write_ready_file(config.ready_file, kv_port=receiver.port, role="decode",
                            node_id=registration.record.node_id if registration else None)
    log.info("decode node ready: grpc %s:%d, kv %s", config.host, server.port, receiver.endpoint)

    await server.wait_and_drain(servicer.num_active)
    if registration is not None:
        await registration.close()
    receiver.close()
    await loop.close()
