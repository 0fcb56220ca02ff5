"""The decode node's admission queue: a burst of three times what its cache holds waits
instead of being refused, and every request returns the engine's tokens on its first
attempt; the queue is first come first served, and only a full queue refuses."""

import concurrent.futures
import random

import grpc
import pytest

from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

from .serving import all_blocks_free, generate, node_stats, wait_for

DECODE_BLOCKS = 24  # a request below takes 8 blocks at its end: 3 at a time
PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def test_a_burst_beyond_the_cache_waits_and_completes():
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(100)] for _ in range(9)]
    expected = [c.token_ids for c in Engine(model="dummy:tiny", num_kv_blocks=512).generate(prompts, PARAMS)]
    with Cluster("dummy:tiny", 1, 1, node_args=["--num-kv-blocks", "160"],
                 decode_args=["--num-kv-blocks", str(DECODE_BLOCKS)]) as cluster:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: generate(cluster.router_address, p, PARAMS), prompts))
        for (tokens, last, _), want in zip(results, expected):
            assert tokens == want
            assert last.timings.num_attempts == 1  # never refused, never retried
        assert wait_for(lambda: all_blocks_free(cluster))


def test_the_queue_is_fifo_and_only_a_full_queue_refuses():
    """Reservations made on the decode node itself (their KV never comes; they outlive the
    test) fill its 160 blocks 38 at a time: the fifth waits (queue of one), the sixth is
    refused; when one holder goes, the waiting one gets its ticket."""
    prompt = [5] * 600  # 38 blocks
    with Cluster("dummy:tiny", 1, 1, node_args=["--num-kv-blocks", "160"],
                 decode_args=["--reservation-timeout-s", "600", "--max-queued-requests", "1"]) as cluster:
        decode = cluster.decode[0]
        with grpc.insecure_channel(decode.address) as channel:
            stub = pb_grpc.DecodeServiceStub(channel)

            def reserve(i):
                return stub.Decode(pb.DecodeRequest(request_id=f"hold-{i}", prompt_token_ids=prompt), timeout=600,
                                   metadata=decode.metadata)

            holds = [reserve(i) for i in range(4)]
            try:
                assert all(next(h).HasField("ticket") for h in holds)
                waiting = reserve(4)
                assert wait_for(lambda: node_stats(decode).num_waiting == 1)
                with pytest.raises(grpc.RpcError) as refused:
                    next(reserve(5))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "wait for KV blocks" in refused.value.details()
                holds.pop(0).cancel()
                assert next(waiting).HasField("ticket")  # its turn came
                holds.append(waiting)
                assert node_stats(decode).num_reserved == 4
            finally:
                for h in holds:
                    h.cancel()
        assert wait_for(lambda: all_blocks_free(cluster))
