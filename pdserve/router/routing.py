"""Where a prompt goes: a (prefill, decode) pair, or a decode node that prefills it itself, from
the healthy nodes, the policy, and what each node's prefix cache holds (the Redis index, and
the prompts this router sent lately: `PendingPrefixes`)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.block_hash import block_hashes
from pdserve.service import metrics

from .nodes import NodeClient, NodePool
from .pending_prefixes import PendingPrefixes
from .policy import queued_prefill_tokens
from .prefix_index import MAX_LOOKUP_BLOCKS

DISAGGREGATION = ("always", "never", "auto")


@dataclass
class Route:
    prefill: NodeClient | None  # None: the decode node prefills the prompt itself
    decode: NodeClient
    num_cached_tokens: int  # what the index says the node that prefills holds of the prompt


class Routes:
    def __init__(self, pool: NodePool, policy, index=None, model_fingerprint: str = "",
                 disaggregation: str = "auto", prefill_here_max_tokens: int = 512):
        """`disaggregation`: where prompts are prefilled (always on a prefill node, never, or
        auto: see `prefill_here`); `index`: the PrefixIndex, None to route by load."""
        if disaggregation not in DISAGGREGATION:
            raise ValueError(f"--disaggregation must be one of {', '.join(DISAGGREGATION)}, got {disaggregation!r}")
        self.pool, self.policy, self.index, self.model_fingerprint = pool, policy, index, model_fingerprint
        self.disaggregation, self.prefill_here_max_tokens = disaggregation, prefill_here_max_tokens
        self.pending = PendingPrefixes()

    def can_serve(self) -> bool:
        """Whether the healthy nodes can serve a prompt (the router's health)."""
        return bool(self.pool.healthy("decode") and (self.pool.healthy("prefill") or self.disaggregation != "always"))

    def needed_nodes(self) -> str:
        return "prefill and decode nodes" if self.disaggregation == "always" else "decode nodes"

    async def choose(self, prompt: list[int], cache_salt: str, excluded: set,
                     full_nodes: set) -> Route | None:
        """A (prefill, decode) pair, or a decode node alone that prefills the prompt itself
        (`prefill_here`; what each node's cache holds as the index and this router's recent
        routes know it). Avoids nodes that failed this request where others exist; decode
        nodes that were full are never retried."""
        candidates = []
        for role in ("prefill", "decode"):
            healthy = [n for n in self.pool.healthy(role) if n not in full_nodes]
            candidates.append([n for n in healthy if n not in excluded] or healthy)
        prefill_nodes, decode_nodes = candidates
        if self.disaggregation == "never":
            prefill_nodes = []
        if not decode_nodes or (not prefill_nodes and self.disaggregation == "always"):
            return None
        decode = self.policy.pick_decode(decode_nodes, len(prompt))
        if not prefill_nodes:  # nothing to choose between: no hashing, no index lookup
            metrics.route_decisions.labels(self.policy.name, "prefill_on_decode").inc()
            return Route(None, decode, 0)
        hashes = self._block_hashes(prompt, cache_salt, decode) if self.policy.uses_index else []
        cached = await self._cached_tokens(hashes, prefill_nodes + [decode]) if self.policy.uses_index else {}
        if hashes:
            self.pending.add(hashes, decode)  # it will hold the prompt's blocks either way
        prefill, reason = self.policy.pick_prefill(
            prefill_nodes, len(prompt), None if cached is None else {n: c for n, c in cached.items() if n in prefill_nodes})
        if self.prefill_here(len(prompt), decode, prefill, cached or {}):
            metrics.route_decisions.labels(self.policy.name, "prefill_on_decode").inc()
            return Route(None, decode, (cached or {}).get(decode, 0))
        metrics.route_decisions.labels(self.policy.name, reason).inc()
        if hashes:
            self.pending.add(hashes, prefill)
        return Route(prefill, decode, (cached or {}).get(prefill, 0))

    def prefill_here(self, num_tokens: int, decode: NodeClient, prefill: NodeClient, cached: dict) -> bool:
        """`auto`: whether the decode node should prefill the prompt itself: it would compute
        at most `prefill_here_max_tokens` tokens (those its prefix cache lacks), and its first
        token would come sooner there: fewer tokens to compute before it, counting each node's
        queue of prefill work (the prompts a burst already sent to the decode node too, or a
        burst of short prompts would all queue there while the prefill node idles)."""
        if self.disaggregation != "auto":
            return False
        here = num_tokens - cached.get(decode, 0)
        there = queued_prefill_tokens(prefill) + num_tokens - cached.get(prefill, 0)
        return here <= self.prefill_here_max_tokens and queued_prefill_tokens(decode) + here < there

    def _block_hashes(self, prompt: list[int], cache_salt: str, node: NodeClient) -> list[bytes]:
        """The hashes of the prompt's blocks a prefill node could reuse (not the one holding the
        last token, which is always computed), at most MAX_LOOKUP_BLOCKS."""
        if self.index is None or node.stats is None:
            return []
        block_size = node.stats.block_size
        leading = prompt[:min(len(prompt) - 1, MAX_LOOKUP_BLOCKS * block_size)]
        return block_hashes(leading, block_size, self.model_fingerprint, cache_salt or None)

    async def _cached_tokens(self, hashes: list[bytes], nodes: list[NodeClient]) -> dict[NodeClient, int] | None:
        """Prefill node -> prompt tokens it holds, or will once the requests this router sent
        it are computed; None (route by load) without an answering index."""
        runs = await self.index.lookup(hashes) if self.index is not None else None
        if runs is None:
            return None
        by_id, block_size = self.pool.by_node_id(), nodes[0].stats.block_size
        cached = {by_id[i]: n for i, n in runs.items() if by_id.get(i) in nodes}
        for node, n in self.pending.runs(hashes).items():
            if node in nodes:
                cached[node] = max(cached.get(node, 0), n)
        return {node: n * block_size for node, n in cached.items()}
