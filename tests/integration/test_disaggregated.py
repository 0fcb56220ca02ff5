"""The disaggregated path with real processes on loopback: a router, two prefill and two
decode nodes serving `dummy:tiny` (and `smollm2-135m`, for one test), one decode node asking
for the `nccl` connector (gloo between these CPU processes), the other for `ipc` (its prefill
nodes, on this host, write its blocks in place), so every test runs over both (the load policy
alternates idle decode nodes); the smollm2 cluster pairs `ipc` with `tcp`. The oracle is the
in-process Engine on the same prompts."""

import concurrent.futures
import os
import random
import socket
import urllib.request

import grpc
import pytest

from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service.convert import sampling_to_proto

from .serving import GREEDY, all_blocks_free, generate, health, metric, node_stats, random_prompts as prompts, wait_for

NODE_ARGS = ["--num-kv-blocks", "160", "--max-num-batched-tokens", "256"]
RESERVATION_TIMEOUT_S = 2.0  # far above a loopback transfer, short enough to test expiry


@pytest.fixture(scope="module")
def cluster():
    timeout = ["--reservation-timeout-s", str(RESERVATION_TIMEOUT_S)]
    with Cluster("dummy:tiny", num_prefill=2, num_decode=2, node_args=NODE_ARGS,
                 decode_args=[[*timeout, "--kv-connector", c] for c in ("nccl", "ipc")],
                 router_args=["--policy", "load"]) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return Engine(model="dummy:tiny", num_kv_blocks=512, max_model_len=2048)


def test_streamed_tokens_equal_the_engine(cluster, reference):
    cases = prompts(0, [1, 16, 17, 300, 45])  # one token; a block edge; many blocks (19)
    params = [GREEDY] * 4 + [SamplingParams(temperature=0.8, top_k=50, seed=3, max_tokens=12, ignore_eos=True)]
    expected = [c.token_ids for c in reference.generate(cases, params)]
    for prompt, p, want in zip(cases, params, expected):
        tokens, last, count = generate(cluster.router_address, prompt, p)
        assert tokens == want
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == 12
        assert count >= 2 and last.timings.num_attempts == 1
    assert wait_for(lambda: all_blocks_free(cluster))


@pytest.fixture(scope="module")
def smollm2():
    """The bundled SmolLM2-135M-Instruct on the same layout: 2 prefill nodes, 2 decode nodes
    (one ipc, one tcp), with its in-process Engine as the oracle."""
    with Cluster("smollm2-135m", num_prefill=2, num_decode=2, node_args=NODE_ARGS,
                 decode_args=[["--kv-connector", c] for c in ("ipc", "tcp")],
                 router_args=["--policy", "load"]) as c:
        yield c, Engine(model="smollm2-135m")


def test_smollm2_streams_equal_the_engine(smollm2):
    cluster, reference = smollm2
    cases = prompts(9, [1, 16, 33, 250, 70, 120])  # 250 tokens: 16 blocks
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [c.token_ids for c in reference.generate(cases, params)]
    for prompt, want in zip(cases, expected):
        tokens, last, _ = generate(cluster.router_address, prompt, params)
        assert tokens == want
        assert last.usage.completion_tokens == 12
    assert wait_for(lambda: all_blocks_free(cluster))


def test_32_concurrent_streams_all_complete_correctly(cluster, reference):
    rng = random.Random(5)
    cases = prompts(1, [rng.randrange(1, 120) for _ in range(32)])
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 24), ignore_eos=True) for _ in cases]
    expected = [c.token_ids for c in reference.generate(cases, params)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda a: generate(cluster.router_address, *a), zip(cases, params)))
    for (tokens, last, _), want, p in zip(results, expected, params):
        assert tokens == want  # nothing lost, nothing duplicated, nothing out of order
        assert last.usage.completion_tokens == p.max_tokens
    assert wait_for(lambda: all_blocks_free(cluster))


def test_cancelling_a_stream_frees_every_block(cluster):
    with grpc.insecure_channel(cluster.router_address) as channel:
        from pdserve.client import generate_request
        call = pb_grpc.RouterServiceStub(channel).Generate(generate_request(
            prompts(2, [200])[0], SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)))
        received = [next(call) for _ in range(3)]
        assert all(r.token_ids for r in received)
        assert not all_blocks_free(cluster)  # the request holds blocks on its decode node
        call.cancel()
    assert wait_for(lambda: all_blocks_free(cluster))


@pytest.mark.parametrize("prompt,params,field", [
    ([5, 6], SamplingParams(temperature=-1), "temperature"),
    ([5, 6], SamplingParams(top_p=0), "top_p"),
    ([5, 6], SamplingParams(max_tokens=-3), "max_tokens"),
    ([5, 100000], GREEDY, "prompt.token_ids"),
    ([], GREEDY, "prompt"),
    ("some text", GREEDY, "prompt.text"),  # dummy:tiny has no tokenizer
    (list(range(3, 400)) * 6, GREEDY, "prompt"),  # longer than max_model_len
])
def test_bad_input_is_invalid_argument_naming_the_field(cluster, prompt, params, field):
    with pytest.raises(grpc.RpcError) as info:
        generate(cluster.router_address, prompt, params)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_a_reservation_without_kv_expires_at_its_deadline(cluster):
    decode = cluster.decode[1]
    with grpc.insecure_channel(decode.address) as channel:
        call = pb_grpc.DecodeServiceStub(channel).Decode(
            pb.DecodeRequest(request_id="never-sent", prompt_token_ids=prompts(6, [100])[0]),
            metadata=decode.metadata)
        ticket = next(call).ticket
        assert len(ticket.block_ids) == 7 and node_stats(decode).num_reserved == 1
        with pytest.raises(grpc.RpcError) as info:
            for message in call:  # nobody pushes the KV: heartbeats (empty chunks) until the deadline
                assert not message.chunk.token_ids and not message.chunk.finish_reason
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert node_stats(decode).num_reserved == 0
    assert wait_for(lambda: all_blocks_free(cluster))


def test_random_bytes_on_the_kv_port_do_not_hurt_the_decode_node(cluster, reference):
    for decode in cluster.decode:
        for size in (3, 72, 4096):
            with socket.create_connection(("127.0.0.1", decode.info["kv_port"])) as s:
                s.sendall(os.urandom(size))
    prompt = prompts(4, [40])[0]
    (want,) = reference.generate([prompt], GREEDY)
    for _ in range(2):  # both decode nodes (the load policy alternates idle ones)
        assert generate(cluster.router_address, prompt)[0] == want.token_ids
    assert all(p.popen.poll() is None for p in cluster.decode)


def test_health_reflection_and_metrics(cluster):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    generate(cluster.router_address, prompts(12, [40])[0])  # a request for the metrics to count
    for p in cluster.processes:
        assert health(p.address) == "SERVING"
    with grpc.insecure_channel(cluster.router_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"pdserve.v1.RouterService", "grpc.health.v1.Health"} <= names
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.router.info['metrics_port']}/metrics").read().decode()
    count = next(line for line in text.splitlines() if line.startswith("pdserve_time_to_first_token_seconds_count"))
    assert float(count.split()[-1]) > 0
    assert sum(kv_bytes_received(d) for d in cluster.decode) > 0


@pytest.mark.parametrize("connector", ["nccl", "ipc"])
def test_each_connector_carries_a_request(cluster, reference, connector):
    """The test routes one request by hand to the decode node that asks for `connector` (over a
    gloo pair, or written in place by the prefill node): reserve there, prefill on a prefill node
    with its ticket, then read the decode stream. Its tokens equal the engine's, and that node
    counts the KV (and, for ipc, a transfer written in place)."""
    decode = cluster.decode[("nccl", "ipc").index(connector)]
    in_place = metric(decode, "pdserve_kv_transfers_in_place_total")
    prompt, params = prompts(11, [70])[0], GREEDY
    [want] = reference.generate([prompt], params)
    before = kv_bytes_received(decode)
    request = dict(prompt_token_ids=prompt, sampling=sampling_to_proto(params))
    with grpc.insecure_channel(decode.address) as d, grpc.insecure_channel(cluster.prefill[0].address) as p:
        decode_call = pb_grpc.DecodeServiceStub(d).Decode(pb.DecodeRequest(request_id=f"by-hand-{connector}",
                                                                           **request), timeout=60,
                                                          metadata=decode.metadata)
        ticket = next(decode_call).ticket
        assert ticket.connector == connector
        first = pb_grpc.PrefillServiceStub(p).Prefill(pb.PrefillRequest(request_id=f"by-hand-{connector}",
                                                                        ticket=ticket, **request), timeout=60,
                                                      metadata=decode.metadata)
        tokens = [first.first_token_id] + [t for m in decode_call for t in m.chunk.token_ids]
    assert tokens == want.token_ids
    assert kv_bytes_received(decode) > before
    assert metric(decode, "pdserve_kv_transfers_in_place_total") == in_place + (connector == "ipc")
    assert wait_for(lambda: all_blocks_free(cluster))


def kv_bytes_received(decode_node) -> float:
    """The KV bytes the node's metrics count as received."""
    return metric(decode_node, "pdserve_kv_transfer_bytes_total", direction="received")
