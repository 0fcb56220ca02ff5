"""Per-request block tables over the block pool: prefix lookup, slot allocation, caching, free."""

from __future__ import annotations

from .block_hash import block_hashes, root_hash
from .block_pool import Block, BlockPool
from .request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, model_fingerprint: str,
                 enable_caching: bool = True):
        self.block_size = block_size
        self.model_fingerprint = model_fingerprint
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.block_tables: dict[str, list[Block]] = {}  # request_id -> its blocks, in order
        self.num_cached_blocks: dict[str, int] = {}  # request_id -> leading blocks already cached
        # while a launched step may still write KV (async scheduling), freed tables wait here:
        # a block goes back to the pool only once no step in flight can write it
        self.held: list[list[Block]] | None = None

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.block_tables.get(request_id, ())]

    def update_block_hashes(self, request: Request) -> None:
        """Extends `request.block_hashes` to cover every full block of its tokens."""
        num_hashed = len(request.block_hashes)
        if request.num_tokens < (num_hashed + 1) * self.block_size:
            return
        parent = (request.block_hashes[-1] if num_hashed else
                  root_hash(self.model_fingerprint, self.block_size, request.cache_salt))
        request.block_hashes += block_hashes(request.all_token_ids, self.block_size,
                                             self.model_fingerprint, parent_hash=parent,
                                             start_block=num_hashed)

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """The longest run of the request's leading blocks found in the prefix cache.

        At least one token is always left to compute: the last prompt token's logits are
        needed to sample, so a fully cached prompt gives back all but its last block.
        """
        if not self.enable_caching:
            return []
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        tokens = request.all_token_ids
        hits = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, tokens[i * self.block_size:(i + 1) * self.block_size])
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[Block] | None = None) -> bool:
        """Makes room for `num_new_tokens` more tokens after the computed ones.

        `computed_blocks` (first schedule only) are prefix-cache hits to adopt. Returns False,
        changing nothing, when the pool cannot provide the blocks.
        """
        table = self.block_tables.setdefault(request.request_id, [])
        computed_blocks = computed_blocks or []
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = cdiv(num_tokens, self.block_size) - len(table) - len(computed_blocks)
        # hits sitting in the free queue stop being free once touched
        num_evictable_hits = sum(1 for b in computed_blocks if b.ref_count == 0)
        if num_needed > self.pool.num_free_blocks - num_evictable_hits:
            if not table:
                del self.block_tables[request.request_id]
            return False
        self.pool.touch(computed_blocks)
        table += computed_blocks
        if num_needed > 0:
            table += self.pool.allocate(num_needed)
        return True

    def cache_blocks(self, request: Request) -> None:
        """Caches every block that is full of computed tokens and not yet cached."""
        if not self.enable_caching:
            return
        self.update_block_hashes(request)
        table = self.block_tables[request.request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        start = self.num_cached_blocks.get(request.request_id, 0)
        if start >= num_full:
            return
        for i in range(start, num_full):
            self.pool.cache(table[i], request.block_hashes[i],
                            request.token_ids(i * self.block_size, (i + 1) * self.block_size))
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Releases the request's blocks, last block first (see BlockPool.free); while frees
        are held, they reach the pool at `release_held`."""
        table = self.block_tables.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        if self.held is not None:
            self.held.append(table)
        else:
            self.pool.free(table[::-1])

    def hold_frees(self) -> None:
        """A step was launched and not yet waited for: later frees wait for `release_held`."""
        if self.held is None:
            self.held = []

    def release_held(self) -> None:
        """Nothing in flight writes the held blocks any more: back to the pool, in free order."""
        held, self.held = self.held or [], None
        for table in held:
            self.pool.free(table[::-1])
