"""The router's view of its nodes: a channel and stub each, health and stats polled in the
background, and the requests the router itself has in flight on each (torch-free)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from service import metrics
from service.server import MAX_MESSAGE_BYTES

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
    num_inflight_tokens: int = 0  # their prompt tokens (prefill load not yet in stats)

    @classmethod
    def connect(cls, role: str, address: str) -> "NodeClient":
        channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        return cls(role, address, channel)

    @property
    def stub(self):
        return STUBS[self.role](self.channel)

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            log.warning("%s node %s marked down: %s", self.role, self.address, reason)
        self.healthy = False


class NodePool:
    """Static node lists (discovery through Redis comes with the prefix-index issue)."""

    def __init__(self, prefill: list[str], decode: list[str], poll_interval_s: float = 0.5):
        self.nodes = ([NodeClient.connect("prefill", a) for a in prefill] +
                      [NodeClient.connect("decode", a) for a in decode])
        self.poll_interval_s = poll_interval_s
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()

    def healthy(self, role: str) -> list[NodeClient]:
        return [n for n in self.nodes if n.role == role and n.healthy]

    def model_limits(self) -> tuple[int, int] | None:
        """(max_model_len, vocab_size) every healthy node accepts; None before any reported."""
        stats = [n.stats for n in self.nodes if n.healthy and n.stats is not None]
        if not stats:
            return None
        return min(s.max_model_len for s in stats), min(s.vocab_size for s in stats)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="node-health")

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(n) for n in self.nodes))
        for role in STUBS:
            metrics.nodes_healthy.labels(role).set(len(self.healthy(role)))
        self.changed.set()

    async def _watch(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, node: NodeClient) -> None:
        """Healthy = health SERVING and stats answered, both within a second."""
        try:
            health = health_pb2_grpc.HealthStub(node.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return node.mark_down("health is NOT_SERVING")
            node.stats = await node.stub.GetStats(pb.StatsRequest(), timeout=1.0)
            if not node.healthy:
                log.info("%s node %s is serving", node.role, node.address)
            node.healthy = True
        except grpc.aio.AioRpcError as e:
            node.mark_down(f"{e.code().name}: {e.details()}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(n.channel.close() for n in self.nodes))
