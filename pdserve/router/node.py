"""`pdserve router`: serves RouterService over the prefill and decode nodes it is given or
finds in the Redis registry."""

from __future__ import annotations

import asyncio
import logging

from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service.server import Server, service_name

from pdserve.service import metrics
from pdserve.service.cluster_auth import ClusterAuth
from pdserve.service.tls import Tls
from pdserve.service.tracing import Tracing

from .api_keys import ApiKeys, metadata_key
from .config import RouterConfig
from .nodes import NodePool
from .policy import make_policy
from .prefix_index import PrefixIndex
from .routing import Routes
from .service import RouterServicer

log = logging.getLogger(__name__)


def _addresses(text: str, flag: str, required: bool) -> list[str]:
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{flag}: {a!r} is not host:port")
    if required and not addresses:
        raise ValueError(f"{flag}: give at least one host:port, or --redis-url to find nodes there")
    return addresses


async def serve(config: RouterConfig) -> None:
    from pdserve.engine.model_source import resolve_model

    policy = make_policy(config.policy)
    if config.max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {config.max_attempts}")
    source = resolve_model(config.model)
    model_config = source.model_config()
    tokenizer, vocab_size = source.tokenizer(), model_config.vocab_size
    fingerprint = model_config.fingerprint(source.weights_id())
    auth, tls = ClusterAuth.from_env(), Tls.from_env()
    static = config.redis_url is None
    index = PrefixIndex(config.redis_url, fingerprint) if config.redis_url else None
    if policy.uses_index and index is None:
        log.warning("policy %s without --redis-url: no prefix index, routing by load", policy.name)
    pool = NodePool(_addresses(config.prefill_nodes, "--prefill-nodes", static and config.disaggregation == "always"),
                    _addresses(config.decode_nodes, "--decode-nodes", static), config.health_interval_s,
                    index, fingerprint, config.heartbeat_grace_s, auth.metadata, tls)
    api_keys = ApiKeys(config.api_key, config.cache_isolation)
    server = Server(service_name("RouterService"), config.host, config.port, config.metrics_port,
                    config.drain_timeout_s, auth, _authenticate(auth, api_keys), tls,
                    metrics.role_registry("router", config.model))
    routes = Routes(pool, policy, index, fingerprint, config.disaggregation, config.prefill_here_max_tokens)
    servicer = RouterServicer(routes, tokenizer, vocab_size, config.max_attempts, config.model,
                              config.stream_timeout_s, api_keys, config.resume_wait_s)
    servicer.tracing = Tracing("pdserve-router", config.otlp_endpoint)
    pb_grpc.add_RouterServiceServicer_to_server(servicer, server.grpc)
    await server.start()
    pool.start()
    watcher = asyncio.get_running_loop().create_task(_follow_nodes(server, servicer, config.ready_file))
    await server.wait_and_drain()
    servicer.tracing.close()
    watcher.cancel()
    await pool.close()
    if index is not None:
        await index.close()


def _authenticate(auth: ClusterAuth, api_keys: ApiKeys):
    """Generate takes a client's API key (when keys are set) or a member's cluster secret (the
    gateway's calls, which carry the client's key too: it salts per-key caches). GetInfo (the
    model's name and limits, the healthy node counts) is open, as the gateway's /health is."""
    def refusal(method: str, metadata) -> str | None:
        if (not method.endswith("/Generate") or not api_keys.enabled or (auth.enabled and auth.admits(metadata))
                or api_keys.valid(metadata_key(metadata))):
            return None
        return "invalid or missing API key (send metadata authorization: Bearer <key>)"
    return refusal


async def _follow_nodes(server: Server, servicer: RouterServicer, ready_file: str | None) -> None:
    """Health SERVING while the healthy nodes can serve (a decode node, and a prefill node
    where prompts are always prefilled there); the ready file is written the first time."""
    ready, pool = None, servicer.pool
    while True:
        await pool.changed.wait()
        pool.changed.clear()
        serving = servicer.routes.can_serve()
        if serving != ready:
            log.info("router %s", "serving" if serving else f"NOT serving: no healthy {servicer.routes.needed_nodes()}")
            await server.set_serving(serving)
            if serving and ready is None:
                server.write_ready_file(ready_file, role="router")
            ready = serving
