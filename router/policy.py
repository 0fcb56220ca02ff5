"""Routing policies: which prefill node and which decode node serve a request (torch-free).

`round_robin` cycles through the healthy nodes. `load` picks the prefill node with the least
prompt work queued (its reported queue plus what this router sent since) and the decode node
with the fewest requests (running, reserved, and in flight from this router) that has room.
Prefix-aware routing (`prefix`) comes with the Redis prefix index.
"""

from __future__ import annotations

import itertools

from .nodes import NodeClient


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._counter = {"prefill": itertools.count(), "decode": itertools.count()}

    def pick(self, role: str, nodes: list[NodeClient], num_prompt_tokens: int) -> NodeClient:
        return nodes[next(self._counter[role]) % len(nodes)]


class LeastLoaded:
    name = "load"

    def pick(self, role: str, nodes: list[NodeClient], num_prompt_tokens: int) -> NodeClient:
        if role == "prefill":
            return min(nodes, key=_prefill_load)
        blocks = -(-num_prompt_tokens // max(1, nodes[0].stats.block_size if nodes[0].stats else 16))
        roomy = [n for n in nodes if n.stats is None or n.stats.num_free_blocks >= blocks] or nodes
        return min(roomy, key=_decode_load)


def _prefill_load(node: NodeClient) -> tuple[int, int]:
    queued = node.stats.num_queued_prefill_tokens if node.stats else 0
    return (queued + node.num_inflight_tokens, node.num_inflight)


def _decode_load(node: NodeClient) -> tuple[int, int]:
    stats = node.stats
    running = stats.num_running + stats.num_reserved if stats else 0
    return (running + node.num_inflight, -(stats.num_free_blocks if stats else 0))


POLICIES = {"round_robin": RoundRobin, "load": LeastLoaded}


def make_policy(name: str):
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]()
