"""Routing policies: which prefill node and which decode node serve a request (torch-free).

- `round_robin` cycles through the healthy nodes.
- `load` picks the prefill node with the least prompt work queued (the uncached tokens this
  router has in flight there plus the queue other routers put there, from its stats) and the decode node with the fewest requests
  (running, reserved, and in flight from this router) that has room.
- `prefix` (the default) picks the prefill node of least estimated work,
  `cost(P) = queued_prefill_tokens(P) + prompt_tokens - cached_prefix_tokens(P)`, where the
  cached prefix comes from the Redis index; decode nodes as `load`. Without an answer from
  the index it routes as `load` (reason `index_unavailable`).

Ties go round-robin, so an idle cluster spreads new prefixes over its nodes. `pick_prefill`
returns the node and the reason for the choice (metric `pdserve_route_decisions_total`).
"""

from __future__ import annotations

import itertools

from .nodes import NodeClient


class RoundRobin:
    name = "round_robin"
    uses_index = False

    def __init__(self):
        self._turn = {"prefill": itertools.count(), "decode": itertools.count()}

    def pick_prefill(self, nodes: list[NodeClient], num_prompt_tokens: int,
                     cached: dict[NodeClient, int] | None) -> tuple[NodeClient, str]:
        return nodes[next(self._turn["prefill"]) % len(nodes)], "round_robin"

    def pick_decode(self, nodes: list[NodeClient], num_prompt_tokens: int) -> NodeClient:
        return nodes[next(self._turn["decode"]) % len(nodes)]


class LeastLoaded(RoundRobin):
    name = "load"

    def pick_prefill(self, nodes, num_prompt_tokens, cached):
        return self._least(nodes, _prefill_load), "least_load"

    def pick_decode(self, nodes, num_prompt_tokens):
        blocks = -(-num_prompt_tokens // max(1, nodes[0].stats.block_size if nodes[0].stats else 16))
        roomy = [n for n in nodes if n.stats is None or n.stats.num_free_blocks >= blocks] or nodes
        return self._least(roomy, _decode_load)

    def _least(self, nodes: list[NodeClient], key) -> NodeClient:
        best = min(key(n) for n in nodes)
        ties = [n for n in nodes if key(n) == best]
        if len(ties) == 1:  # the turn moves on ties only, so new prefixes alternate strictly
            return ties[0]
        return ties[next(self._turn["prefill" if nodes[0].role == "prefill" else "decode"]) % len(ties)]


class PrefixAware(LeastLoaded):
    name = "prefix"
    uses_index = True

    def pick_prefill(self, nodes, num_prompt_tokens, cached):
        if cached is None:
            return super().pick_prefill(nodes, num_prompt_tokens, cached)[0], "index_unavailable"

        def cost(node: NodeClient) -> tuple[int, int]:
            queued, inflight = _prefill_load(node)
            return queued + num_prompt_tokens - cached.get(node, 0), inflight

        node = self._least(nodes, cost)
        if cached.get(node, 0) > 0:
            return node, "prefix_hit"
        return node, "least_load_over_prefix" if any(cached.get(n, 0) for n in nodes) else "no_prefix_cached"


def queued_prefill_tokens(node: NodeClient) -> int:
    """Prompt tokens a prefill node has yet to compute (as its stats and this router know)."""
    return node.num_other_queued_tokens + node.num_inflight_tokens


def _prefill_load(node: NodeClient) -> tuple[int, int]:
    return (queued_prefill_tokens(node), node.num_inflight)


def _decode_load(node: NodeClient) -> tuple[int, int]:
    stats = node.stats
    running = stats.num_running + stats.num_reserved if stats else 0
    return (running + node.num_inflight, -(stats.num_free_blocks if stats else 0))


POLICIES = {"round_robin": RoundRobin, "load": LeastLoaded, "prefix": PrefixAware}


def make_policy(name: str):
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]()
