"""Prefixes this router has just sent to a prefill node, before the index can know them
(torch-free).

A prefill node publishes a block once it has computed it, so a tenant's second request that
arrives while the first is still queued would find nothing in Redis and could go to another
node, which then computes the same prefix again. The router therefore remembers, for a short
while, which node it sent each block hash to, and counts those blocks as (soon) cached there.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class PendingPrefixes:
    def __init__(self, ttl_s: float = 30.0, max_entries: int = 1 << 20):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        # block hash -> {node: expiry}, oldest insertions first (pruned from the front)
        self._entries: OrderedDict[bytes, dict] = OrderedDict()

    def add(self, block_hashes: list[bytes], node) -> None:
        expiry = time.monotonic() + self.ttl_s
        for h in block_hashes:
            nodes = self._entries.pop(h, {})
            nodes[node] = expiry
            self._entries[h] = nodes
        self._prune()

    def runs(self, block_hashes: list[bytes]) -> dict:
        """node -> how many of the leading blocks were sent to it and have not expired."""
        now, runs, holding = time.monotonic(), {}, None
        for i, h in enumerate(block_hashes):
            nodes = {n for n, expiry in self._entries.get(h, {}).items() if expiry > now}
            holding = nodes if holding is None else holding & nodes
            if not holding:
                break
            for node in holding:
                runs[node] = i + 1
        return runs

    def _prune(self) -> None:
        now = time.monotonic()
        while self._entries:
            h, nodes = next(iter(self._entries.items()))
            if len(self._entries) <= self.max_entries and max(nodes.values()) > now:
                break
            del self._entries[h]
