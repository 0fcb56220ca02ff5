"""`pdserve prefill`: loads the engine, opens the KV sender, serves PrefillService."""

from __future__ import annotations

import asyncio
import logging

from pdserve.engine.config import EngineConfig
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service import metrics
from pdserve.service.tracing import Tracing
from pdserve.service.node_registration import register
from pdserve.service.server import Server, service_name

from .config import PrefillNodeConfig
from .service import PrefillServicer

log = logging.getLogger(__name__)


async def serve(engine_config: EngineConfig, config: PrefillNodeConfig) -> None:
    from pdserve.engine.engine import Engine
    from pdserve.engine.engine_loop import EngineLoop
    from pdserve.engine.device_turns import check_device_turns
    from pdserve.kv_transfer.ipc_sender import IpcKVSender
    from pdserve.kv_transfer.nccl import NcclKVSender
    from pdserve.kv_transfer.senders import SenderByConnector
    from pdserve.kv_transfer.tcp_sender import TcpKVSender

    check_device_turns(config.device_turns)
    server = Server(service_name("PrefillService"), config.host, config.port, config.metrics_port,
                    config.drain_timeout_s, metrics_registry=metrics.role_registry("prefill", engine_config.model))
    servicer = PrefillServicer(config.kv_test_hold_prefill_s, server.auth)
    servicer.server = server
    servicer.tracing = Tracing("pdserve-prefill", config.otlp_endpoint)
    pb_grpc.add_PrefillServiceServicer_to_server(servicer, server.grpc)
    await server.start()  # health answers NOT_SERVING while the model loads
    engine = await asyncio.to_thread(Engine, engine_config)
    sender = SenderByConnector({  # the connector each ticket asks for, made on first use
        "tcp": lambda: TcpKVSender(config.kv_connect_timeout_s, config.kv_test_corrupt_transfers,
                                   tls=server.tls.kv_client()),
        "nccl": lambda: NcclKVSender(engine.runner.device, config.kv_connect_timeout_s,
                                     config.kv_transfer_timeout_s, tls=server.tls.kv_client()),
        "ipc": lambda: IpcKVSender(engine.runner.device, config.kv_connect_timeout_s,
                                   tls=server.tls.kv_client())})
    registration = None

    def after_step(stats: dict) -> None:
        metrics.update_engine_stats(stats)
        if registration is not None:
            registration.update_load(stats)

    turns = _turns(config, engine.runner.device)
    servicer.attach(EngineLoop(engine, servicer.step if turns is None else turns.around(servicer.step),
                               after_step), sender)
    servicer.loop.start()
    registration = await register(config, "prefill", config.host, server.port, engine.fingerprint,
                                  cache=engine.kv.pool, run_on_engine=servicer.loop.call)
    after_step(engine.stats())
    await server.set_serving(True)
    server.write_ready_file(config.ready_file, role="prefill",
                            node_id=registration.record.node_id if registration else None)
    log.info("prefill node ready: grpc %s:%d", config.host, server.port)

    await server.wait_and_drain(servicer.num_active)
    servicer.tracing.close()
    if registration is not None:
        await registration.close()
    sender.close()
    await servicer.loop.close()
    if turns is not None:
        turns.close()


def _turns(config: PrefillNodeConfig, device):
    """Steps in turn with a decode node on the same device (engine/device_turns.py), or None."""
    from pdserve.engine.device_turns import DeviceTurns, device_key

    key = device_key(device)
    return DeviceTurns(key, "prefill") if key is not None and config.device_turns == "prefill-first" else None
