"""The Redis schema of the prefix index and node registry, shared by nodes and routers
(torch-free). Under `ns = pdserve:{model_fingerprint}`:

    {ns}:blk:{hash hex}        SET of prefill node ids that hold the block
    {ns}:node:{id}:blocks      SET of block hashes (hex) that node published, to purge it
    {ns}:node:{id}             HASH: the node's record (NodeRecord); its TTL is the heartbeat
    {ns}:nodes                 SET of registered node ids (discovery without SCAN)

Who removes what: a node purges its own entries when it starts, when it stops and when it
finds its record gone (Redis restarted); a router purges a node whose record expired.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

# what a failed Redis call raises: its own errors, and OSError from the socket underneath
REDIS_ERRORS = (RedisError, OSError)


class IndexKeys:
    def __init__(self, model_fingerprint: str):
        self.ns = f"pdserve:{model_fingerprint}"
        self.nodes = f"{self.ns}:nodes"

    def block(self, block_hash: bytes) -> str:
        return f"{self.ns}:blk:{block_hash.hex()}"

    def node(self, node_id: str) -> str:
        return f"{self.ns}:node:{node_id}"

    def node_blocks(self, node_id: str) -> str:
        return f"{self.ns}:node:{node_id}:blocks"


@dataclass
class NodeRecord:
    """What a node tells the registry on each heartbeat."""

    node_id: str
    role: str  # prefill | decode
    address: str  # host:port of its gRPC service
    connector: str = "tcp"
    num_queued_prefill_tokens: int = 0
    num_running: int = 0
    num_free_blocks: int = 0

    def to_redis(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_redis(cls, fields: dict) -> "NodeRecord":
        """From HGETALL (bytes or str); raises ValueError on a malformed record."""
        text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in fields.items()}
        try:
            return cls(**{f.name: int(text[f.name]) if f.type == "int" else text[f.name]
                          for f in dataclasses.fields(cls)})
        except (KeyError, ValueError) as e:
            raise ValueError(f"malformed node record {text!r}: {e}") from None


def connect(redis_url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    """A client that fails fast (timeouts on connect and on every call) rather than hang a
    request or a heartbeat; it reconnects by itself on the next call."""
    return aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s,
                                   socket_connect_timeout=timeout_s, health_check_interval=0)


async def purge_node(client: aioredis.Redis, keys: IndexKeys, node_id: str) -> int:
    """Removes a node's blocks from the index, its record and its registration; returns the
    number of blocks it held. Idempotent: a node and any router may run it."""
    hashes = await client.smembers(keys.node_blocks(node_id))
    async with client.pipeline(transaction=False) as pipe:
        unindex_blocks(pipe, keys, node_id, hashes)
        pipe.delete(keys.node(node_id))
        pipe.srem(keys.nodes, node_id)
        await pipe.execute()
    return len(hashes)


def unindex_blocks(pipe, keys: IndexKeys, node_id: str, hex_hashes) -> None:
    """Queues the removal of `node_id` from the blocks it published (`hex_hashes`, the members
    of its node_blocks set) and of that set."""
    for h in hex_hashes:
        pipe.srem(f"{keys.ns}:blk:{h.decode() if isinstance(h, bytes) else h}", node_id)
    pipe.delete(keys.node_blocks(node_id))
