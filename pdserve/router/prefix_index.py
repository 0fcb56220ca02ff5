"""The router's reads of Redis: which prefill nodes hold a prompt's leading blocks, and which
nodes are registered and alive (torch-free).

Nothing here fails or slows a request: when Redis is unreachable a lookup returns None at
once (the router routes by load alone), which is logged once and shown in
`pdserve_redis_up`; the node poll (`discover`, every health interval) keeps trying and turns
prefix routing back on when Redis answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pdserve.service import metrics
from pdserve.service.redis_keys import REDIS_ERRORS, IndexKeys, NodeRecord, connect, purge_node

log = logging.getLogger(__name__)

MAX_LOOKUP_BLOCKS = 512  # leading blocks looked up per prompt (8k tokens of 16)

# KEYS: the prompt's block keys in order. Returns [node id, run, node id, run, ...]: for each
# node, how many leading blocks it holds. Runs inside Redis: one round trip, one reply, and it
# stops reading at the first block no node of the run holds.
LEADING_RUNS_LUA = """
local holding, runs = nil, {}
for i, key in ipairs(KEYS) do
  local still, any = {}, false
  for _, node in ipairs(redis.call('SMEMBERS', key)) do
    if holding == nil or holding[node] then still[node] = true; any = true end
  end
  if not any then break end
  holding = still
  for node, _ in pairs(holding) do runs[node] = i end
end
local out = {}
for node, n in pairs(runs) do out[#out + 1] = node; out[#out + 1] = n end
return out
"""


@dataclass
class LiveNode:
    record: NodeRecord
    expires_at: float  # time.monotonic() when its heartbeat runs out, unless renewed


class PrefixIndex:
    def __init__(self, redis_url: str, model_fingerprint: str):
        self.redis_url = redis_url
        self.keys = IndexKeys(model_fingerprint)
        self.client = connect(redis_url)
        self._leading_runs = self.client.register_script(LEADING_RUNS_LUA)
        self.up: bool | None = None  # None until the first call
        self.up_since = 0.0  # monotonic time Redis was last seen coming up (or restarting)
        self._run_id: str | None = None

    async def lookup(self, block_hashes: list[bytes]) -> dict[str, int] | None:
        """node id -> how many of the prompt's leading blocks that node holds (nodes holding
        none are absent); None when Redis is unreachable. One round trip (a Lua script)."""
        hashes = block_hashes[:MAX_LOOKUP_BLOCKS]
        if self.up is False:  # no request waits on a dead Redis; `discover` notices its return
            return None
        if not hashes:
            return {}
        start = time.perf_counter()
        try:
            reply = await self._leading_runs(keys=[self.keys.block(h) for h in hashes])
        except REDIS_ERRORS as e:
            self._set_up(False, e)
            return None
        self._set_up(True)
        metrics.index_lookup_seconds.observe(time.perf_counter() - start)
        return {_text(node): int(n) for node, n in zip(reply[0::2], reply[1::2])}

    async def discover(self) -> tuple[list[LiveNode], set[str]] | None:
        """(the registered nodes whose heartbeat lives, the ids of those whose heartbeat ran out
        and that this call purged); None when Redis is unreachable."""
        try:
            run_id = (await self.client.info("server")).get("run_id")
            node_ids = sorted(_text(m) for m in await self.client.smembers(self.keys.nodes))
            now = time.monotonic()  # before the TTLs are read: deadlines err on the early side
            async with self.client.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.hgetall(self.keys.node(node_id))
                    pipe.pttl(self.keys.node(node_id))
                replies = await pipe.execute()
            live, expired = [], set()
            for node_id, fields, ttl_ms in zip(node_ids, replies[0::2], replies[1::2]):
                if not fields or ttl_ms == -2:  # the heartbeat ran out: purge what it published
                    num_blocks = await purge_node(self.client, self.keys, node_id)
                    log.warning("node %s: heartbeat expired; purged it and its %d blocks from the "
                                "index", node_id, num_blocks)
                    expired.add(node_id)
                    continue
                try:
                    record = NodeRecord.from_redis(fields)
                except ValueError as e:
                    log.warning("node %s: %s", node_id, e)
                    continue
                live.append(LiveNode(record, now + max(0, ttl_ms) / 1000))
        except REDIS_ERRORS as e:
            self._set_up(False, e)
            return None
        if run_id != self._run_id:  # first contact, or Redis restarted (it lost the registry)
            self._run_id, self.up_since = run_id, time.monotonic()
        self._set_up(True)
        return live, expired

    def _set_up(self, up: bool, error: Exception | None = None) -> None:
        if up and self.up is not True:
            self.up_since = time.monotonic()
            log.info("redis at %s: %s; prefix-aware routing on", self.redis_url,
                     "connected" if self.up is None else "reachable again")
        elif not up and self.up is not False:
            log.warning("redis at %s is unreachable (%s); routing by load only until it is back",
                        self.redis_url, error)
        self.up = up
        metrics.redis_up.set(1 if up else 0)

    async def close(self) -> None:
        await self.client.aclose()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
