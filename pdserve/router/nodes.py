"""The router's view of its nodes: a channel and stub each, health and stats polled in the
background, and the requests the router itself has in flight on each (torch-free).

Nodes come from static flags, from the Redis registry, or both (matched by address). A
registered node is routable only while its heartbeat lives (`expires_at`); while Redis is
unreachable the heartbeats cannot be read and gRPC health alone decides. After Redis comes up
(or restarts empty) nodes get one TTL to re-register before the ones missing are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service import metrics
from pdserve.service.server import MAX_MESSAGE_BYTES
from pdserve.service.tls import Tls

log = logging.getLogger(__name__)

STUBS = {"prefill": pb_grpc.PrefillServiceStub, "decode": pb_grpc.DecodeServiceStub}


@dataclass(eq=False)
class NodeClient:
    role: str  # prefill | decode
    address: str  # host:port
    channel: grpc.aio.Channel = field(repr=False)
    healthy: bool = False
    stats: pb.NodeStats | None = None
    num_inflight: int = 0  # this router's requests on the node
    num_inflight_tokens: int = 0  # their uncached prompt tokens: this router's load there, exact
    num_sent_prompt_tokens: int = 0  # prompt tokens this router sent for prefill, ever
    num_done_prompt_tokens: int = 0  # ... and of those, the ones whose prefill has returned
    num_other_queued_tokens: int = 0  # queued prefill work that is not this router's
    static: bool = True  # from a flag: kept whatever the registry says
    node_id: str | None = None  # its id in the Redis registry and prefix index
    expires_at: float | None = None  # monotonic end of its heartbeat (None: not known)
    metadata: tuple = ()  # what every call carries: the cluster secret (service/cluster_auth.py)

    @property
    def routable(self) -> bool:
        return self.healthy and (self.expires_at is None or time.monotonic() < self.expires_at)

    @classmethod
    def connect(cls, role: str, address: str, metadata: tuple = (), tls: Tls = Tls()) -> "NodeClient":
        channel = tls.channel(address, [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        return cls(role, address, channel, metadata=metadata)

    def update_stats(self, stats: pb.NodeStats, num_done_before: int) -> None:
        """Takes a stats reply. Its queue counts this router's requests too, but is stale by the
        time it arrives; only the rest (other routers' work) is kept. Ours at the node's moment
        were at most the prompt tokens sent by now and not done before the call (a queued
        request counts whole until its cache hit is found), so the rest errs low."""
        ours = self.num_sent_prompt_tokens - num_done_before
        self.num_other_queued_tokens = max(0, stats.num_queued_prefill_tokens - ours)
        self.stats = stats

    @property
    def stub(self):
        return STUBS[self.role](self.channel)

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            log.warning("%s node %s marked down: %s", self.role, self.address, reason)
        self.healthy = False


class PrefillWork:
    """A prompt this router sent a node to prefill, counted in the node's queue of prefill work
    (`NodeClient.num_inflight_tokens`, and the totals that reconcile it with the node's stats)
    from now until `done()` (its first token, or the call's end; once)."""

    def __init__(self, node: NodeClient, num_prompt_tokens: int, num_cached_tokens: int):
        self.node, self.num_prompt_tokens = node, num_prompt_tokens
        self.num_tokens = num_prompt_tokens - num_cached_tokens  # the work it adds to the node
        node.num_inflight_tokens += self.num_tokens
        node.num_sent_prompt_tokens += num_prompt_tokens
        self.open = True

    def done(self) -> None:
        if self.open:
            self.open = False
            self.node.num_inflight_tokens -= self.num_tokens
            self.node.num_done_prompt_tokens += self.num_prompt_tokens



class NodePool:
    def __init__(self, prefill: list[str], decode: list[str], poll_interval_s: float = 0.5,
                 index=None, model_fingerprint: str | None = None, heartbeat_grace_s: float = 10.0,
                 metadata: tuple = (), tls: Tls = Tls()):
        """`index`: a PrefixIndex to discover nodes from; `model_fingerprint`: nodes serving
        other weights are never routed to; `heartbeat_grace_s`: how long registered nodes
        may be missing after Redis comes up before they are dropped; `metadata`: what every call
        to a node carries (the cluster secret); `tls`: how nodes are dialled."""
        self.metadata, self.tls = metadata, tls
        self.nodes = ([NodeClient.connect("prefill", a, metadata, tls) for a in prefill] +
                      [NodeClient.connect("decode", a, metadata, tls) for a in decode])
        self.poll_interval_s = poll_interval_s
        self.index, self.model_fingerprint = index, model_fingerprint
        self.heartbeat_grace_s = heartbeat_grace_s
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()  # channels of dropped nodes, closed once idle
        self.changed = asyncio.Event()

    def healthy(self, role: str) -> list[NodeClient]:
        return [n for n in self.nodes if n.role == role and n.routable]

    def by_node_id(self) -> dict[str, NodeClient]:
        return {n.node_id: n for n in self.nodes if n.node_id is not None}

    def model_limits(self) -> tuple[int, int] | None:
        """(max_model_len, vocab_size) every healthy node accepts; None before any reported."""
        stats = [n.stats for n in self.nodes if n.healthy and n.stats is not None]
        if not stats:
            return None
        return min(s.max_model_len for s in stats), min(s.vocab_size for s in stats)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="node-health")

    async def poll_once(self) -> None:
        if self.index is not None:
            self._follow_registry(await self.index.discover())
        await asyncio.gather(*(self._poll(n) for n in self.nodes))
        for role in STUBS:
            metrics.nodes_healthy.labels(role).set(len(self.healthy(role)))
        self.changed.set()

    async def _watch(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    def _follow_registry(self, registry: tuple[list, set[str]] | None) -> None:
        """Adds newly registered nodes, renews heartbeats, drops nodes whose heartbeat ran out."""
        if registry is None:  # Redis unreachable: heartbeats unknown, gRPC health decides
            for node in self.nodes:
                node.expires_at = None
            return
        live, expired = registry
        by_address = {(n.role, n.address): n for n in self.nodes}
        seen = set()
        for entry in live:
            record = entry.record
            if record.role not in STUBS:
                continue
            node = by_address.get((record.role, record.address))
            if node is None:
                node = NodeClient.connect(record.role, record.address, self.metadata, self.tls)
                node.static = False
                self.nodes.append(node)
                log.info("discovered %s node %s at %s", record.role, record.node_id, record.address)
            node.node_id, node.expires_at = record.node_id, entry.expires_at
            seen.add(node)
        # a node gone from a Redis that just restarted empty may not have re-registered yet;
        # one whose record this router saw expire, or gone otherwise, is not routed to
        restarted = time.monotonic() - self.index.up_since < self.heartbeat_grace_s
        for node in [n for n in self.nodes if n not in seen and n.node_id is not None]:
            if restarted and node.node_id not in expired:
                node.expires_at = None
            elif node.static:
                node.expires_at = 0.0  # flags keep it known; routable again once it registers
            else:
                log.warning("%s node %s at %s left the registry; no longer routed to",
                            node.role, node.node_id, node.address)
                self.nodes.remove(node)
                task = asyncio.get_running_loop().create_task(_close_when_idle(node))
                self._closing.add(task)  # a task nobody references may be collected mid-way
                task.add_done_callback(self._closing.discard)

    async def _poll(self, node: NodeClient) -> None:
        """Healthy = health SERVING and stats answered, both within a second."""
        try:
            health = health_pb2_grpc.HealthStub(node.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return node.mark_down("health is NOT_SERVING")
            num_done_before = node.num_done_prompt_tokens
            stats = await node.stub.GetStats(pb.StatsRequest(), timeout=1.0, metadata=node.metadata)
            if self.model_fingerprint and stats.model_fingerprint != self.model_fingerprint:
                return node.mark_down(f"it serves model {stats.model_fingerprint}, this router "
                                      f"{self.model_fingerprint}")
            node.update_stats(stats, num_done_before)
            if not node.healthy:
                log.info("%s node %s is serving", node.role, node.address)
            node.healthy = True
        except grpc.aio.AioRpcError as e:
            node.mark_down(f"{e.code().name}: {e.details()}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(n.channel.close() for n in self.nodes))


async def _close_when_idle(node: NodeClient) -> None:
    while node.num_inflight:
        await asyncio.sleep(1.0)
    await node.channel.close()
