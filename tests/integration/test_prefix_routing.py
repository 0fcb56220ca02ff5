"""The Redis prefix index, the node registry and prefix-aware routing, against real
redis-server processes and real node processes serving `dummy:tiny`. The oracles: the block
hashes the router computes (engine/block_hash.py), the tokens of the in-process Engine, and
the cached-token counts the prefill nodes report."""

import asyncio
import random
import threading

import pytest
import redis

from pdserve.engine.block_hash import block_hashes
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.engine import Engine
from pdserve.engine.model_source import resolve_model
from pdserve.engine.sampling_params import SamplingParams
from pdserve.cluster import Cluster
from pdserve.redis_local import LocalRedis
from pdserve.router.prefix_index import PrefixIndex
from pdserve.service.node_registration import NodeRegistration
from pdserve.service.redis_keys import IndexKeys, NodeRecord

from .serving import GREEDY, generate, metric, wait_for

MODEL, BLOCK_SIZE = "dummy:tiny", 16
FAST_HEARTBEAT = ["--heartbeat-interval-s", "0.2", "--heartbeat-ttl-s", "1.5"]
FAST_ROUTER = ["--health-interval-s", "0.2", "--heartbeat-grace-s", "3"]
ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def _fingerprint() -> str:
    source = resolve_model(MODEL)
    return source.model_config().fingerprint(source.weights_id())


FINGERPRINT = _fingerprint()
KEYS = IndexKeys(FINGERPRINT)


def lookup(url: str, prompt: list[int], salt: str | None = None) -> dict[str, int]:
    """The router's own lookup: node id -> leading blocks of `prompt` it holds."""
    hashes = block_hashes(prompt[:-1], BLOCK_SIZE, FINGERPRINT, salt)

    async def run():
        index = PrefixIndex(url, FINGERPRINT)
        try:
            return await index.lookup(hashes)
        finally:
            await index.close()

    return asyncio.run(run())


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 512) for _ in range(n)]  # never EOS (2)


@pytest.fixture
def redis_server(tmp_path):
    with LocalRedis(str(tmp_path / "redis")) as server:
        yield server


def test_index_follows_the_cache_through_eviction_salt_restart_and_expiry(redis_server):
    url, raw = redis_server.url, redis.Redis.from_url(redis_server.url)
    rng = random.Random(0)
    # every prompt prefilled on the prefill node, whose index this follows (by default a prompt
    # its decode node holds, as it holds floods[0] after the restart, would be prefilled there)
    with Cluster(MODEL, 1, 1, redis=url, node_args=["--num-kv-blocks", "24"], prefill_args=FAST_HEARTBEAT,
                 router_args=FAST_ROUTER + ["--disaggregation", "always"]) as cluster:
        node = cluster.prefill[0].info["node_id"]
        prompt = tokens(rng, 99)  # 98 tokens before the last: 6 full blocks
        generate(cluster.router_address, prompt, ONE_TOKEN)
        assert wait_for(lambda: lookup(url, prompt) == {node: 6})
        assert lookup(url, prompt, salt="tenant-b") == {}  # another tenant shares nothing
        _, last, _ = generate(cluster.router_address, prompt, ONE_TOKEN, cache_salt="tenant-b")
        assert last.usage.cached_tokens == 0
        assert wait_for(lambda: lookup(url, prompt, salt="tenant-b") == {node: 6})
        _, last, _ = generate(cluster.router_address, prompt, ONE_TOKEN)
        assert last.usage.cached_tokens == 96

        # two prompts of 12 blocks each take all 24 blocks: the LRU evicts the first prompt's
        floods = [tokens(rng, 190), tokens(rng, 190)]
        for flood in floods:
            generate(cluster.router_address, flood, ONE_TOKEN)
        assert wait_for(lambda: lookup(url, prompt) == {} and lookup(url, prompt, "tenant-b") == {})
        assert lookup(url, floods[1]) == {node: 11}

        # a crashed node restarted on its address: nothing of its old cache stays indexed
        restarted = cluster.restart("prefill-0")
        assert restarted.info["node_id"] == node
        assert lookup(url, floods[1]) == {} and raw.scard(KEYS.node_blocks(node)) == 0

        # a node that dies for good: the router purges it once its heartbeat runs out
        assert wait_for(lambda: metric(cluster.router, "pdserve_nodes_healthy", role="prefill") == 1)
        generate(cluster.router_address, floods[0], ONE_TOKEN)
        assert wait_for(lambda: lookup(url, floods[0]) == {node: 11})
        restarted.popen.kill()
        assert wait_for(lambda: not raw.sismember(KEYS.nodes, node), timeout=10)
        assert lookup(url, floods[0]) == {} and raw.scard(KEYS.node_blocks(node)) == 0
        assert not raw.exists(KEYS.node(node))


def test_a_node_stays_registered_while_it_resyncs(redis_server):
    """A resync (after any Redis error, such as a reply later than the client's timeout on a
    loaded node) waits for the engine thread's cache snapshot. A router that looked in that
    window once found the node gone, dropped it and failed a stream for want of decode nodes
    (benchmarks/faults.py, a decode node killed beside it); the node must stay registered
    throughout, and its index end up exactly its cache."""
    url, raw = redis_server.url, redis.Redis.from_url(redis_server.url)
    rng = random.Random(5)
    hashes = block_hashes(tokens(rng, 32), BLOCK_SIZE, FINGERPRINT, None)

    async def run():
        pool = BlockPool(4)
        blocks = pool.allocate(2)
        for block, block_hash in zip(blocks, hashes):
            pool.cache(block, block_hash, [0])
        pool.free(blocks)
        in_snapshot, engine_free = asyncio.Event(), asyncio.Event()

        async def run_on_engine(read):  # an engine thread busy with a step until told
            in_snapshot.set()
            await engine_free.wait()
            return read()

        node = NodeRecord("decode-busy", "decode", "127.0.0.1:1")
        registration = NodeRegistration(url, KEYS, node, 5.0, 1.0, pool, run_on_engine)
        index = PrefixIndex(url, FINGERPRINT)
        try:
            engine_free.set()
            await registration.beat()
            assert await index.lookup(hashes) == {"decode-busy": 2}
            pool.allocate(4)  # evicts both cached blocks; the node then loses Redis for a moment
            registration._set_up(False, TimeoutError("a reply later than the timeout"))
            engine_free.clear()
            beat = asyncio.create_task(registration.beat())
            await in_snapshot.wait()
            live, expired = await index.discover()
            assert [n.record.node_id for n in live] == ["decode-busy"] and not expired
            engine_free.set()
            await beat
            live, _ = await index.discover()
            assert [n.record.node_id for n in live] == ["decode-busy"]
            assert await index.lookup(hashes[:1]) == {} and raw.scard(KEYS.node_blocks("decode-busy")) == 0
        finally:
            engine_free.set()  # else close() would wait on the beat's lock for ever
            await registration.close()
            await index.close()

    asyncio.run(run())


def shared_prefix_workload(seed: int, num_tenants: int = 8, per_tenant: int = 4, prefix_len: int = 512):
    """(tenant, prompt) in a shuffled order: each tenant's system prompt plus a user turn."""
    rng = random.Random(seed)
    systems = [tokens(rng, prefix_len) for _ in range(num_tenants)]
    requests = [(t, systems[t] + tokens(rng, 16)) for t in range(num_tenants) for _ in range(per_tenant)]
    rng.shuffle(requests)
    return requests


def cached_token_ratio(policy: str, requests, prefix_len: int = 512) -> float:
    """Cached prompt tokens over the achievable ones (every request of a tenant after its
    first could reuse the whole system prompt)."""
    # each prefill node's cache holds the prefixes of 6 tenants, not of all 8
    with Cluster(MODEL, 2, 1, redis="local", prefill_args=["--num-kv-blocks", "230"],
                 router_args=["--policy", policy]) as cluster:
        seen, cached, achievable = set(), 0, 0
        for tenant, prompt in requests:
            _, last, _ = generate(cluster.router_address, prompt, ONE_TOKEN)
            cached += last.usage.cached_tokens
            achievable += prefix_len if tenant in seen else 0
            seen.add(tenant)
        return cached / achievable


def test_prefix_routing_keeps_tenants_where_their_prefix_is_cached():
    requests = shared_prefix_workload(seed=1)
    prefix = cached_token_ratio("prefix", requests)
    round_robin = cached_token_ratio("round_robin", requests)
    print(f"cached-token ratio: prefix {prefix:.2f}, round_robin {round_robin:.2f}")
    assert prefix >= 0.85
    assert round_robin <= prefix - 0.2


def test_redis_killed_mid_workload_loses_no_request(redis_server):
    reference = Engine(model=MODEL, num_kv_blocks=512)
    requests = shared_prefix_workload(seed=2, num_tenants=4, per_tenant=6, prefix_len=64)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    long_prompt, long_params = tokens(random.Random(3), 40), SamplingParams(temperature=0, max_tokens=1000,
                                                                           ignore_eos=True)
    expected = [c.token_ids for c in reference.generate([p for _, p in requests] + [long_prompt],
                                                       [params] * len(requests) + [long_params])]
    with Cluster(MODEL, 2, 1, redis=redis_server.url, node_args=FAST_HEARTBEAT,
                 router_args=FAST_ROUTER) as cluster:
        got = {}
        streaming = threading.Thread(target=lambda: got.setdefault(
            "long", generate(cluster.router_address, long_prompt, long_params)[0]))
        streaming.start()  # a stream that lives through the outage
        for i, (_, prompt) in enumerate(requests):
            if i == 8:
                redis_server.stop(kill=True)
            if i == 16:
                redis_server.start()
            got[i] = generate(cluster.router_address, prompt, params)[0]
        streaming.join(120)
        assert [got[i] for i in range(len(requests))] + [got["long"]] == expected
        assert metric(cluster.router, "pdserve_route_decisions_total", reason="index_unavailable") >= 8

        # back: the nodes republish, the router routes by prefix again
        raw = redis.Redis.from_url(redis_server.url)
        assert wait_for(lambda: raw.scard(KEYS.nodes) == 3, timeout=10)
        assert metric(cluster.router, "pdserve_redis_up") == 1
        hits = metric(cluster.router, "pdserve_route_decisions_total", reason="prefix_hit")
        _, prompt = requests[0]
        generate(cluster.router_address, prompt, params)
        assert metric(cluster.router, "pdserve_route_decisions_total", reason="prefix_hit") == hits + 1


def test_router_never_routes_to_a_node_whose_heartbeat_expired(redis_server):
    """prefill-1 loses Redis (its ACL user is switched off) while its gRPC stays healthy."""
    raw = redis.Redis.from_url(redis_server.url)
    raw.execute_command("ACL", "SETUSER", "p1", "on", ">secret", "~*", "&*", "+@all")
    url_p1 = redis_server.url.replace("unix://", "unix://p1:secret@")
    with Cluster(MODEL, 2, 1, redis=redis_server.url, node_args=FAST_HEARTBEAT,
                 prefill_args=[[], ["--redis-url", url_p1]],
                 router_args=[*FAST_ROUTER, "--policy", "round_robin"]) as cluster:
        p1 = cluster.prefill[1]
        rng = random.Random(4)

        def computed() -> float:  # requests prefill-1 has served
            return metric(p1, "pdserve_requests_total", role="prefill", outcome="ok")

        raw.execute_command("ACL", "SETUSER", "p1", "off")
        raw.execute_command("CLIENT", "KILL", "USER", "p1")
        assert wait_for(lambda: not raw.exists(KEYS.node(p1.info["node_id"])), timeout=10)
        before = computed()
        for _ in range(10):  # round robin would send half of these to prefill-1
            assert len(generate(cluster.router_address, tokens(rng, 30), GREEDY)[0]) == 12
        assert computed() == before

        raw.execute_command("ACL", "SETUSER", "p1", "on")  # it re-registers; routed to again
        assert wait_for(lambda: raw.exists(KEYS.node(p1.info["node_id"])), timeout=10)

        def routed_again() -> bool:
            generate(cluster.router_address, tokens(rng, 30), ONE_TOKEN)
            return computed() > before

        assert wait_for(routed_again, timeout=10)

