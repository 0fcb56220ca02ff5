"""`pdserve decode`: loads the engine, opens the KV receiver, serves DecodeService."""

from __future__ import annotations

import asyncio
import logging

from pdserve.engine.config import EngineConfig
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service import metrics
from pdserve.service.tracing import Tracing
from pdserve.service.cluster_auth import check_exposure
from pdserve.service.node_registration import register
from pdserve.service.server import Server, service_name

from .config import DecodeNodeConfig
from .service import DecodeServicer

log = logging.getLogger(__name__)


async def serve(engine_config: EngineConfig, config: DecodeNodeConfig) -> None:
    from pdserve.engine.engine import Engine
    from pdserve.engine.engine_loop import EngineLoop
    from pdserve.engine.device_turns import check_device_turns
    from pdserve.kv_transfer.senders import CONNECTORS
    from pdserve.kv_transfer.receiver import KVSocketReceiver

    check_device_turns(config.device_turns)
    if config.kv_connector not in CONNECTORS:
        raise ValueError(f"--kv-connector must be one of {', '.join(CONNECTORS)}, got {config.kv_connector!r}")

    server = Server(service_name("DecodeService"), config.host, config.port, config.metrics_port,
                    config.drain_timeout_s, metrics_registry=metrics.role_registry("decode", engine_config.model))
    check_exposure(config.kv_host, server.auth, "the KV receiver")
    servicer = DecodeServicer(config.reservation_timeout_s, config.kv_connector, config.max_queued_requests,
                              server.auth)
    servicer.server = server
    servicer.tracing = Tracing("pdserve-decode", config.otlp_endpoint)
    metrics.admission_queue_length.set_function(lambda: servicer.admission.num_waiting)
    pb_grpc.add_DecodeServiceServicer_to_server(servicer, server.grpc)
    await server.start()  # health answers NOT_SERVING while the model loads
    ipc = config.kv_connector == "ipc"  # a CPU pool then lives in a memfd, which senders here may open
    engine = await asyncio.to_thread(Engine, engine_config.replace(kv_cache_shared=ipc))
    receiver = KVSocketReceiver(engine.runner.kv_caches, config.kv_host, config.kv_port, config.kv_advertise_host,
                                pair_timeout=config.kv_transfer_timeout_s,
                                transfer_timeout=config.kv_transfer_timeout_s, tls=server.tls.kv_server(), ipc=ipc)
    registration = None

    def after_step(stats: dict) -> None:
        servicer.admission.kick()  # a step may have freed blocks
        metrics.update_engine_stats(stats)
        if registration is not None:
            registration.update_load(stats)

    turns = _turns(config, engine.runner.device)
    loop = EngineLoop(engine, engine.step if turns is None else turns.around(engine.step), after_step)
    servicer.attach(loop, receiver)
    loop.start()
    registration = await register(config, "decode", config.host, server.port, engine.fingerprint,
                                  cache=engine.kv.pool, run_on_engine=loop.call)  # for prefill-here routing
    after_step(engine.stats())
    await server.set_serving(True)
    server.write_ready_file(config.ready_file, kv_port=receiver.port, role="decode",
                            node_id=registration.record.node_id if registration else None)
    log.info("decode node ready: grpc %s:%d, kv %s", config.host, server.port, receiver.endpoint)

    await server.wait_and_drain(servicer.num_active)
    servicer.tracing.close()
    if registration is not None:
        await registration.close()
    receiver.close()
    await loop.close()
    if turns is not None:
        turns.close()


def _turns(config: DecodeNodeConfig, device):
    """Steps in turn with a prefill node on the same device (engine/device_turns.py), or None."""
    from pdserve.engine.device_turns import DeviceTurns, device_key

    key = device_key(device)
    return DeviceTurns(key, "decode") if key is not None and config.device_turns == "prefill-first" else None
