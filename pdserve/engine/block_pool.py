"""Ref-counted KV blocks, an LRU free queue and the prefix cache (vLLM v1's design).

A block whose ref count drops to 0 goes to the tail of the free queue but keeps its hash and
content, so a later prompt with the same prefix can take it back (a cache hit). Allocation
takes blocks from the head of the queue (least recently freed first) and only then forgets
their hash (an eviction). Torch-free: the tensors live in the model runner's KV cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and cached
    token_ids: tuple[int, ...] = ()  # the tokens it holds when cached, to confirm a hit


@dataclass
class CacheEvents:
    """The net change of the prefix cache since the last drain (the prefill node publishes it
    to Redis): per hash, its last event wins, so a hash evicted and then stored again within
    one drain reads as stored, and one stored then evicted as evicted."""

    changes: dict[bytes, bool] = field(default_factory=dict)  # block_hash -> stored (else evicted)

    def record(self, block_hash: bytes, stored: bool) -> None:
        self.changes.pop(block_hash, None)  # re-insert: keep the order of last events
        self.changes[block_hash] = stored

    @property
    def stored(self) -> list[bytes]:
        return [h for h, stored in self.changes.items() if stored]

    @property
    def evicted(self) -> list[bytes]:
        return [h for h, stored in self.changes.items() if not stored]

    def __bool__(self) -> bool:
        return bool(self.changes)


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # block_id -> Block for every block with ref_count 0, least recently freed first
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, Block] = {}  # block_hash -> the block that holds it
        self.events = CacheEvents()
        # events are kept once a publisher takes the first snapshot: a node without Redis never
        # drains them, and they would grow with every hash it ever saw
        self.publishing = False

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[Block]:
        """Takes `num_blocks` blocks from the head of the free queue, evicting their hashes.
        The caller has checked there are enough; each comes back with ref_count 1."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Sequence[Block]) -> None:
        """Takes a reference on cache-hit blocks, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Sequence[Block]) -> None:
        """Drops one reference on each block. Pass a request's blocks tail first, so that its
        last blocks are evicted before its first ones (prefixes are the most shareable)."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} freed with ref_count {block.ref_count}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def lookup(self, block_hash: bytes, token_ids: Sequence[int]) -> Block | None:
        """The cached block with this hash, if its token ids match too."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def cache(self, block: Block, block_hash: bytes, token_ids: Sequence[int]) -> None:
        """Marks a full block as holding `block_hash`. If another block already holds that hash
        this one stays uncached (a duplicate), and is simply reused once freed."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block
        if self.publishing:
            self.events.record(block_hash, stored=True)

    def drain_events(self) -> CacheEvents:
        events, self.events = self.events, CacheEvents()
        return events

    def snapshot(self) -> list[bytes]:
        """Every hash the cache holds now; drops the pending events (the snapshot has them).
        Events are recorded from the first snapshot on."""
        self.events = CacheEvents()
        self.publishing = True
        return list(self.cached)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash of free blocks (blocks in use keep theirs)."""
        for block in list(self.free_queue.values()):
            self._evict(block)

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        del self.cached[block.block_hash]
        if self.publishing:
            self.events.record(block.block_hash, stored=False)
        block.block_hash = None
        block.token_ids = ()
