"""Routing decisions (pure): leading runs from index replies, the prefix policy's cost, ties,
and the Redis record format."""

from protos import pdserve_pb2 as pb
from router.nodes import NodeClient
from router.policy import LeastLoaded, PrefixAware, RoundRobin
from router.prefix_index import leading_runs
from service.redis_keys import IndexKeys, NodeRecord


def test_leading_runs_stop_at_the_first_gap():
    members = [{b"a", b"b"}, {b"a", b"b"}, {b"b"}, {b"a", b"b"}, set(), {b"a"}]
    assert leading_runs(members) == {"a": 2, "b": 4}
    assert leading_runs([set(), {b"a"}]) == {} and leading_runs([]) == {}


def node(name: str, queued: int = 0, inflight_tokens: int = 0) -> NodeClient:
    n = NodeClient("prefill", name, channel=None, healthy=True)
    n.stats = pb.NodeStats(role="prefill", num_queued_prefill_tokens=queued, block_size=16)
    n.num_inflight_tokens = inflight_tokens
    return n


def test_prefix_policy_weighs_cached_tokens_against_queued_work():
    policy = PrefixAware()
    a, b = node("a"), node("b")
    assert policy.pick_prefill([a, b], 600, {b: 512}) == (b, "prefix_hit")
    b.stats.num_queued_prefill_tokens = 400  # b's queue still costs less than its 512 cached
    assert policy.pick_prefill([a, b], 600, {b: 512}) == (b, "prefix_hit")
    b.num_inflight_tokens = 200  # 600 tokens of work queued on b: a is cheaper now
    assert policy.pick_prefill([a, b], 600, {b: 512}) == (a, "least_load_over_prefix")
    assert policy.pick_prefill([a, b], 600, None)[1] == "index_unavailable"


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
