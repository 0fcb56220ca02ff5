"""Routing decisions: the index lookup (its Lua script on a real redis-server), prefixes in
flight, the prefix policy's cost, ties, and the Redis record format."""

import asyncio
import time

import redis

from pdserve.redis_local import LocalRedis
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.nodes import NodeClient, PrefillWork
from pdserve.router.pending_prefixes import PendingPrefixes
from pdserve.router.policy import LeastLoaded, PrefixAware, RoundRobin
from pdserve.router.prefix_index import PrefixIndex
from pdserve.service.redis_keys import IndexKeys, NodeRecord


def test_lookup_returns_each_nodes_run_of_leading_blocks(tmp_path):
    holders = [{"a", "b"}, {"a", "b"}, {"b"}, {"a", "b"}, set(), {"a"}]
    hashes = [bytes([i]) * 16 for i in range(len(holders))]
    keys = IndexKeys("fp")
    with LocalRedis(str(tmp_path)) as server:
        raw = redis.Redis.from_url(server.url)
        for h, nodes in zip(hashes, holders):
            for node in nodes:
                raw.sadd(keys.block(h), node)

        async def lookups():
            index = PrefixIndex(server.url, "fp")
            try:
                return [await index.lookup(hs) for hs in (hashes, hashes[4:], hashes[:1], [])]
            finally:
                await index.close()

        assert asyncio.run(lookups()) == [{"a": 2, "b": 4}, {}, {"a": 1, "b": 1}, {}]
    assert asyncio.run(lookups()) == [None] * 3 + [None]  # Redis gone: None, never an error


def test_pending_prefixes_count_blocks_sent_until_they_expire():
    pending = PendingPrefixes(ttl_s=0.2)
    a, b = object(), object()
    pending.add([b"1", b"2", b"3"], a)
    pending.add([b"1", b"9"], b)
    assert pending.runs([b"1", b"2", b"3", b"4"]) == {a: 3, b: 1}
    assert pending.runs([b"2"]) == {a: 1} and pending.runs([b"7", b"1"]) == {}
    time.sleep(0.25)
    assert pending.runs([b"1", b"2"]) == {}


def node(name: str, queued: int = 0) -> NodeClient:
    n = NodeClient("prefill", name, channel=None, healthy=True)
    n.update_stats(pb.NodeStats(role="prefill", num_queued_prefill_tokens=queued, block_size=16), 0)
    return n


def test_prefix_policy_weighs_cached_tokens_against_queued_work():
    policy = PrefixAware()
    a, b = node("a"), node("b")
    assert policy.pick_prefill([a, b], 600, {b: 512}) == (b, "prefix_hit")
    b.update_stats(pb.NodeStats(num_queued_prefill_tokens=400, block_size=16), 0)
    assert policy.pick_prefill([a, b], 600, {b: 512}) == (b, "prefix_hit")  # 400 < 512 cached
    b.num_inflight_tokens = 200  # 600 tokens of work queued on b: a is cheaper now
    assert policy.pick_prefill([a, b], 600, {b: 512}) == (a, "least_load_over_prefix")
    assert policy.pick_prefill([a, b], 600, None)[1] == "index_unavailable"


def test_stale_stats_never_count_this_routers_own_work_twice():
    a = node("a")
    # one request of ours in flight: 528 prompt tokens, 512 of them cached; the node reports
    # it queued whole (its cache hit is not found yet), next to 100 tokens of another router
    a.num_sent_prompt_tokens, a.num_inflight_tokens = 528, 16
    a.update_stats(pb.NodeStats(num_queued_prefill_tokens=528 + 100), num_done_before=0)
    assert a.num_other_queued_tokens == 100
    a.num_done_prompt_tokens, a.num_inflight_tokens = 528, 0  # returned while the reply travelled
    a.update_stats(pb.NodeStats(num_queued_prefill_tokens=528), num_done_before=0)
    assert a.num_other_queued_tokens == 0
    assert PrefixAware().pick_prefill([node("b"), a], 600, {a: 512}) == (a, "prefix_hit")


def test_a_burst_of_short_prompts_is_shared_between_the_decode_node_and_the_prefill_node():
    """The conditional rule (`--prefill-here-max-tokens`) counts the prompts it already gave
    the decode node to prefill as that node's queue (`PrefillWork`), as it counts the prefill
    node's: a burst of 30-token prompts alternates between them, where it used to pile up on the
    decode node while the prefill node idled."""
    from pdserve.router.routing import Routes

    rule = Routes(None, PrefixAware(), disaggregation="auto", prefill_here_max_tokens=512)
    prefill, decode = node("p"), node("d")
    here = []
    for _ in range(8):
        here.append(rule.prefill_here(30, decode, prefill, {}))
        PrefillWork(decode if here[-1] else prefill, 30, 0)  # in flight until the burst ends
    assert here == [False, True] * 4
    assert decode.num_inflight_tokens == prefill.num_inflight_tokens == 120
    work = PrefillWork(decode, 40, 8)
    work.done()
    work.done()  # once only
    assert decode.num_inflight_tokens == 120 and decode.num_done_prompt_tokens == 40


def test_ties_go_round_robin_so_new_prefixes_spread():
    for policy in (PrefixAware(), LeastLoaded()):
        a, b = node("a"), node("b")
        picks = [policy.pick_prefill([a, b], 100, {})[0] for _ in range(4)]
        assert picks.count(a) == 2 and picks.count(b) == 2
    rr = RoundRobin()
    assert [rr.pick_prefill([node("x"), node("y")], 1, None)[1] for _ in range(2)] == ["round_robin"] * 2


def test_node_record_round_trips_through_redis_fields():
    record = NodeRecord("prefill-h:1", "prefill", "h:1", num_queued_prefill_tokens=7, num_free_blocks=3)
    fields = {k.encode(): v.encode() for k, v in record.to_redis().items()}
    assert NodeRecord.from_redis(fields) == record
    keys = IndexKeys("abc")
    assert keys.block(bytes([1, 255])) == "pdserve:abc:blk:01ff"
    assert keys.node_blocks("n") == "pdserve:abc:node:n:blocks" and keys.nodes == "pdserve:abc:nodes"
