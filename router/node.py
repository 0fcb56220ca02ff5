"""`pdserve router`: serves RouterService over the prefill and decode nodes it is given."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from protos import pdserve_pb2_grpc as pb_grpc
from service.server import Server, service_name

from .nodes import NodePool
from .policy import make_policy
from .service import RouterServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    model: str = "smollm2-135m"  # for the tokenizer and vocabulary; the nodes hold the weights
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400
    prefill_nodes: str = "127.0.0.1:50061"  # comma-separated host:port
    decode_nodes: str = "127.0.0.1:50071"
    policy: str = "load"  # round_robin | load
    max_attempts: int = 3  # per request: the first try plus retries/resumes on other pairs
    health_interval_s: float = 0.5
    drain_timeout_s: float = 30.0
    ready_file: str | None = None


def _addresses(text: str, flag: str) -> list[str]:
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{flag}: {a!r} is not host:port")
    if not addresses:
        raise ValueError(f"{flag}: give at least one host:port")
    return addresses


async def serve(config: RouterConfig) -> None:
    from engine.model_source import resolve_model

    policy = make_policy(config.policy)
    if config.max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {config.max_attempts}")
    source = resolve_model(config.model)
    tokenizer, vocab_size = source.tokenizer(), source.model_config().vocab_size
    pool = NodePool(_addresses(config.prefill_nodes, "--prefill-nodes"),
                    _addresses(config.decode_nodes, "--decode-nodes"), config.health_interval_s)
    server = Server(service_name("RouterService"), config.host, config.port, config.metrics_port,
                    config.drain_timeout_s)
    pb_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(pool, policy, tokenizer, vocab_size, config.max_attempts), server.grpc)
    await server.start()
    pool.start()
    watcher = asyncio.get_running_loop().create_task(_follow_nodes(server, pool, config.ready_file))
    await server.wait_and_drain()
    watcher.cancel()
    await pool.close()


async def _follow_nodes(server: Server, pool: NodePool, ready_file: str | None) -> None:
    """Health SERVING while at least one prefill and one decode node are; the ready file is
    written the first time."""
    ready = None
    while True:
        await pool.changed.wait()
        pool.changed.clear()
        serving = bool(pool.healthy("prefill") and pool.healthy("decode"))
        if serving != ready:
            log.info("router %s", "serving" if serving else "NOT serving: no healthy prefill/decode pair")
            await server.set_serving(serving)
            if serving and ready is None:
                server.write_ready_file(ready_file, role="router")
            ready = serving
