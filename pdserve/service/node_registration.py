"""A node's side of Redis: its heartbeat record and its prefix-cache changes.

Three invariants keep the index true:
- One writer per node: the heartbeat and the cache publisher take the same lock, so a
  resynchronisation never interleaves with an incremental batch. Drains and snapshots of
  the cache run on the engine thread and are numbered there; a batch drained before the
  latest snapshot is dropped (the snapshot holds it), one drained after is applied.
- A resync (in one transaction: purge everything this node published, add a snapshot of its
  cache, write its record; the node never leaves the registry meanwhile) runs at start, after any Redis error, and when the node's record is gone
  (Redis restarted empty, or this node stalled past its TTL).
- Redis trouble never reaches a request: it is logged once, the node keeps serving, and the
  next heartbeat that gets through resyncs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .redis_keys import REDIS_ERRORS, IndexKeys, NodeRecord, connect, purge_node, unindex_blocks
from .registry_config import RegistryConfig

log = logging.getLogger(__name__)


async def register(config: RegistryConfig, role: str, bind_host: str, port: int,
                   model_fingerprint: str, cache=None, run_on_engine=None) -> "NodeRegistration | None":
    """Registers the node (first heartbeat, and its cache snapshot when it passes one) and starts
    its heartbeat; None without a redis_url. Redis being down is logged, not raised."""
    if not config.redis_url:
        return None
    host = config.advertise_host or bind_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    address = f"{host}:{port}"
    record = NodeRecord(config.node_id or f"{role}-{address}", role, address)
    registration = NodeRegistration(config.redis_url, IndexKeys(model_fingerprint), record,
                                    config.heartbeat_ttl_s, config.heartbeat_interval_s, cache,
                                    run_on_engine)
    await registration.beat()
    registration.start()
    return registration


class NodeRegistration:
    def __init__(self, redis_url: str, keys: IndexKeys, record: NodeRecord, ttl_s: float,
                 interval_s: float, cache=None,
                 run_on_engine: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None):
        """Nodes pass their BlockPool as `cache` (drain_events(), snapshot()) and
        `run_on_engine`, which runs a function on the engine thread and awaits its result."""
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"heartbeat interval ({interval_s}s) must be positive and shorter "
                             f"than its TTL ({ttl_s}s)")
        self.client = connect(redis_url)
        self.redis_url, self.keys, self.record = redis_url, keys, record
        self.ttl_ms, self.interval_s = int(ttl_s * 1000), interval_s
        self.cache, self.run_on_engine = cache, run_on_engine
        self._seq = 0  # numbers drains and snapshots; only ever changed on the engine thread
        self._snapshot_seq = 0
        self.synced = False  # the index holds exactly this node's cache (as of the last batch)
        self.up: bool | None = None  # Redis reachable at the last try (None: not tried yet)
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat_loop(), name="redis-heartbeat")]
        if self.cache is not None:
            self._tasks.append(loop.create_task(self._publish_loop(), name="redis-publish"))

    def update_load(self, stats: dict) -> None:
        """After each engine step (on the event loop): the load the next heartbeat reports,
        and a wake-up for the publisher when the step changed the prefix cache."""
        self.record.num_queued_prefill_tokens = stats["num_queued_prefill_tokens"]
        self.record.num_running = stats["num_running"]
        self.record.num_free_blocks = stats["num_free_blocks"]
        if stats.get("num_cache_events"):
            self._changed.set()

    async def beat(self) -> None:
        """One heartbeat: resync first where needed, then refresh the record and its TTL."""
        async with self._lock:
            try:
                if not self.synced:
                    await self._resync()
                    return
                node_key = self.keys.node(self.record.node_id)
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.exists(node_key)
                    self._write_record(pipe)
                    existed = (await pipe.execute())[0]
                if not existed:
                    log.warning("redis: this node's record was gone (redis restarted, or the node "
                                "stalled past its TTL); republishing")
                    await self._resync()
                self._set_up(True)
            except REDIS_ERRORS as e:
                self._set_up(False, e)

    async def _resync(self) -> None:
        """Replaces what the index holds of this node by a snapshot of its cache and writes its
        record, in one transaction: the node stays registered throughout (a router that looked
        while it was gone, waiting for the engine's snapshot, would drop a live node)."""
        hashes = []
        if self.cache is not None:
            self._snapshot_seq, hashes = await self.run_on_engine(self._numbered(self.cache.snapshot))
        node_id = self.record.node_id
        old = await self.client.smembers(self.keys.node_blocks(node_id))  # only this node adds to it
        async with self.client.pipeline(transaction=True) as pipe:
            unindex_blocks(pipe, self.keys, node_id, old)
            for h in hashes:
                pipe.sadd(self.keys.block(h), node_id)
            if hashes:
                pipe.sadd(self.keys.node_blocks(node_id), *(h.hex() for h in hashes))
            self._write_record(pipe)
            await pipe.execute()
        self.synced = True
        self._set_up(True)
        log.info("redis: registered %s %s at %s (%d blocks published, replacing %d)",
                 self.record.role, node_id, self.record.address, len(hashes), len(old))

    def _numbered(self, read: Callable[[], Any]) -> Callable[[], tuple[int, Any]]:
        def numbered():  # on the engine thread
            self._seq += 1
            return self._seq, read()
        return numbered

    def _write_record(self, pipe) -> None:
        node_key = self.keys.node(self.record.node_id)
        pipe.hset(node_key, mapping=self.record.to_redis())
        pipe.pexpire(node_key, self.ttl_ms)
        pipe.sadd(self.keys.nodes, self.record.node_id)

    async def publish(self) -> None:
        """Sends the cache changes since the last batch (one pipeline)."""
        seq, events = await self.run_on_engine(self._numbered(self.cache.drain_events))
        if not events:
            return
        async with self._lock:
            if not self.synced or seq < self._snapshot_seq:  # a snapshot holds (or will hold) these
                return
            node_id, stored, evicted = self.record.node_id, events.stored, events.evicted
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for h in stored:
                        pipe.sadd(self.keys.block(h), node_id)
                    for h in evicted:
                        pipe.srem(self.keys.block(h), node_id)
                    if stored:
                        pipe.sadd(self.keys.node_blocks(node_id), *(h.hex() for h in stored))
                    if evicted:
                        pipe.srem(self.keys.node_blocks(node_id), *(h.hex() for h in evicted))
                    await pipe.execute()
            except REDIS_ERRORS as e:
                self._set_up(False, e)

    def _set_up(self, up: bool, error: Exception | None = None) -> None:
        if up and self.up is False:
            log.info("redis at %s is reachable again", self.redis_url)
        elif not up:
            self.synced = False
            if self.up is not False:
                log.warning("redis at %s is unreachable (%s); serving on, and republishing once "
                            "it is back", self.redis_url, error)
        self.up = up

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval_s)

    async def _publish_loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self.publish()
            await asyncio.sleep(0.01)  # batch what the next steps change

    async def close(self) -> None:
        """Deregisters (best effort): a stopped node leaves nothing in the index."""
        for task in self._tasks:
            task.cancel()
        async with self._lock:
            try:
                await purge_node(self.client, self.keys, self.record.node_id)
                log.info("redis: deregistered %s", self.record.node_id)
            except REDIS_ERRORS as e:
                log.warning("redis: could not deregister %s: %s", self.record.node_id, e)
        await self.client.aclose()
