import pytest

from pdserve.engine.block_pool import BlockPool


def test_allocate_free_refcounts_and_lru_eviction():
    pool = BlockPool(4)
    assert pool.snapshot() == []  # a publisher's first act: events are kept from now on
    a, b = pool.allocate(2)
    assert (a.ref_count, b.ref_count, pool.num_free_blocks) == (1, 1, 2)
    pool.cache(a, b"h-a", [1, 2])
    pool.cache(b, b"h-b", [3, 4])
    pool.free([b, a])  # tail first: b is evicted before a
    assert pool.num_free_blocks == 4
    assert pool.lookup(b"h-a", [1, 2]) is a  # freed blocks keep their content
    taken = pool.allocate(3)  # the two never-used blocks, then b (least recently freed)
    assert b in taken and a not in taken
    assert pool.lookup(b"h-b", [3, 4]) is None and pool.lookup(b"h-a", [1, 2]) is a
    events = pool.drain_events()  # net change: b was stored, then evicted
    assert events.stored == [b"h-a"] and events.evicted == [b"h-b"]
    with pytest.raises(RuntimeError):
        pool.free([b, b])  # the second drop would go negative


def test_no_events_are_kept_without_a_publisher():
    """A node without Redis never drains events: none pile up, however many hashes it sees."""
    pool = BlockPool(2)
    for i in range(100):
        (block,) = pool.allocate(1)
        pool.cache(block, f"h-{i}".encode(), [i])
        pool.free([block])
    assert not pool.events and len(pool.cached) == 2


def test_cache_events_are_the_net_change_and_a_snapshot_replaces_them():
    pool = BlockPool(2)
    pool.snapshot()
    a, b = pool.allocate(2)
    pool.cache(a, b"h-a", [1])
    pool.cache(b, b"h-b", [2])
    pool.free([a, b])
    (c,) = pool.allocate(1)  # evicts h-a, the least recently freed
    pool.cache(c, b"h-a", [1])  # stored again before the drain: the last event wins
    events = pool.drain_events()
    assert events.stored == [b"h-b", b"h-a"] and events.evicted == [] and not pool.drain_events()
    (d,) = pool.allocate(1)  # evicts h-b
    assert pool.drain_events().evicted == [b"h-b"]
    pool.cache(d, b"h-d", [4])
    assert sorted(pool.snapshot()) == [b"h-a", b"h-d"]
    assert not pool.drain_events()  # the snapshot holds what was pending


def test_touch_takes_a_hit_out_of_the_free_queue():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache(a, b"h", [5])
    pool.free([a])
    pool.touch([a])
    assert a.ref_count == 1 and pool.num_free_blocks == 1
    pool.touch([a])  # shared by a second request
    pool.free([a])
    assert a.ref_count == 1 and pool.num_free_blocks == 1


def test_hit_is_confirmed_by_token_ids_and_duplicates_stay_uncached():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache(a, b"h", [1, 2, 3])
    assert pool.lookup(b"h", [1, 2, 4]) is None  # same hash, other tokens: no hit
    pool.cache(b, b"h", [1, 2, 3])
    assert b.block_hash is None and pool.lookup(b"h", [1, 2, 3]) is a


def test_disabled_caching_never_hits():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, b"h", [1])
    assert pool.lookup(b"h", [1]) is None
