"""Issue 32's trust boundaries, on real processes (gateway, router, one prefill and one decode
node serving SmolLM2-135M, sharing a cluster secret): the nodes take calls from members only;
a prefill node sends KV only where a member's signed ticket says; malformed protobuf is
INVALID_ARGUMENT on every method, never UNKNOWN; the router's gRPC API takes the API keys;
`--cache-isolation per-key` keeps each key's prefix cache apart."""

import os
import random
import select
import socket
from pathlib import Path

import grpc
import openai
import pytest

from pdserve.client import generate_request
from pdserve.cluster import Cluster
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.frame import FrameHeader, FrameType
from pdserve.protos import pdserve_pb2 as pb

from .serving import all_blocks_free, health, node_stats, wait_for

MODEL, KEYS = "smollm2-135m", ("key-one", "key-two")
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
METHODS = {  # every method of our services, by role
    "router": ["/pdserve.v1.RouterService/Generate", "/pdserve.v1.RouterService/GetInfo"],
    "prefill": ["/pdserve.v1.PrefillService/Prefill", "/pdserve.v1.PrefillService/GetStats"],
    "decode": ["/pdserve.v1.DecodeService/Decode", "/pdserve.v1.DecodeService/GetStats"],
}
STREAMING = {"/pdserve.v1.RouterService/Generate", "/pdserve.v1.DecodeService/Decode"}


@pytest.fixture(scope="module")
def cluster():
    with Cluster(MODEL, 1, 1, gateway_port=0, api_key=",".join(KEYS), redis="local",
                 router_args=["--cache-isolation", "per-key"]) as c:
        yield c


def raw_call(address: str, method: str, data: bytes, metadata=()):
    """`data` as the request bytes, whatever they are; the response's status code."""
    with grpc.insecure_channel(address) as channel:
        kind = channel.unary_stream if method in STREAMING else channel.unary_unary
        call = kind(method, request_serializer=None, response_deserializer=None)
        try:
            reply = call(data, timeout=30, metadata=metadata)
            list(reply) if method in STREAMING else None
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def process_of(cluster, role):
    return {"router": cluster.router, "prefill": cluster.prefill[0], "decode": cluster.decode[0]}[role]


def proc_status(process, field: str) -> int:
    """A number of /proc/<pid>/status: `Threads`, or `VmRSS` (KiB)."""
    status = Path(f"/proc/{process.popen.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")))


def num_threads(process) -> int:
    return proc_status(process, "Threads")


def test_node_services_take_calls_from_members_only(cluster):
    for role in ("prefill", "decode"):
        node = process_of(cluster, role)
        for method in METHODS[role]:
            assert raw_call(node.address, method, b"") == grpc.StatusCode.UNAUTHENTICATED
            wrong = (("pdserve-cluster-secret", "x" * 40),)
            assert raw_call(node.address, method, b"", wrong) == grpc.StatusCode.UNAUTHENTICATED
        assert health(node.address) == "SERVING"  # probes need no secret
    assert node_stats(cluster.decode[0]).num_kv_blocks > 0  # with the secret


def test_a_prefill_node_sends_only_where_a_member_asked(cluster):
    """A ticket naming our own listener, unsigned or with a member's signature over another
    endpoint, is refused before the prefill: nothing connects to the listener, and the prefill
    node starts no sender thread for it."""
    decode, prefill = cluster.decode[0], cluster.prefill[0]
    prompt = list(range(10, 60))
    request = generate_request(prompt, GREEDY)
    with grpc.insecure_channel(decode.address) as channel:
        call = channel.unary_stream("/pdserve.v1.DecodeService/Decode", request_serializer=pb.DecodeRequest.SerializeToString,
                                    response_deserializer=pb.DecodeResponse.FromString)(
            pb.DecodeRequest(request_id="real-ticket", prompt_token_ids=prompt, sampling=request.sampling),
            metadata=decode.metadata, timeout=60)
        ticket = next(call).ticket  # a member's ticket for a real reservation
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            threads_before = num_threads(prefill)
            forged = [pb.KVTicket(), pb.KVTicket()]
            forged[0].CopyFrom(ticket)
            forged[0].kv_endpoint = f"127.0.0.1:{listener.getsockname()[1]}"  # the signature no longer fits
            forged[1].CopyFrom(forged[0])
            forged[1].signature = b""
            with grpc.insecure_channel(prefill.address) as p:
                stub = p.unary_unary("/pdserve.v1.PrefillService/Prefill",
                                     request_serializer=pb.PrefillRequest.SerializeToString,
                                     response_deserializer=pb.PrefillResponse.FromString)
                for i, bad in enumerate(forged * 25):
                    with pytest.raises(grpc.RpcError) as info:
                        stub(pb.PrefillRequest(request_id=f"forged-{i}", prompt_token_ids=prompt,
                                               sampling=request.sampling, ticket=bad),
                             metadata=prefill.metadata, timeout=60)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "signed" in info.value.details()
            assert not select.select([listener], [], [], 0)[0]  # nobody connected
            assert num_threads(prefill) == threads_before
        finally:
            listener.close()
            call.cancel()
    assert wait_for(lambda: all_blocks_free(cluster))


@pytest.mark.parametrize("role", ["router", "prefill", "decode"])
def test_malformed_protobuf_is_invalid_argument(cluster, role):
    node = process_of(cluster, role)
    metadata = node.metadata + (("authorization", f"Bearer {KEYS[0]}"),)
    rng = random.Random(32)
    cases = [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x12\x05ab"]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(60)]
    counts: dict = {}
    for method in METHODS[role]:
        for data in cases:
            code = raw_call(node.address, method, data, metadata)
            counts[code] = counts.get(code, 0) + 1
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, data)
        for data in cases[:4]:  # not a message at all
            assert raw_call(node.address, method, data, metadata) == grpc.StatusCode.INVALID_ARGUMENT
    print(role, {code.name: n for code, n in counts.items()})
    assert all(p.popen.poll() is None for p in cluster.processes)


def test_the_router_api_takes_the_api_keys(cluster):
    address = cluster.router_address
    data = generate_request("Hi", GREEDY).SerializeToString()
    generate = METHODS["router"][0]
    assert raw_call(address, generate, data) == grpc.StatusCode.UNAUTHENTICATED
    assert raw_call(address, generate, data, (("authorization", "Bearer nope"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert raw_call(address, generate, data, (("authorization", f"bearer {KEYS[1]}"),)) == grpc.StatusCode.OK
    assert raw_call(address, generate, data, cluster.router.metadata) == grpc.StatusCode.OK  # a member
    assert raw_call(address, METHODS["router"][1], b"") == grpc.StatusCode.OK  # GetInfo is open


def test_per_key_cache_isolation(cluster):
    """Each API key sees only its own cached prefix: the same prompt from the other key is
    computed anew (0 cached tokens), and again from the same key is a hit."""
    prompt = " ".join(f"word{i}" for i in range(200))

    def cached_tokens(key: str) -> int:
        client = openai.OpenAI(base_url=cluster.gateway_url, api_key=key, max_retries=0, timeout=120)
        usage = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0).usage
        return usage.prompt_tokens_details.cached_tokens

    assert cached_tokens(KEYS[0]) == 0
    assert cached_tokens(KEYS[0]) > 0
    assert cached_tokens(KEYS[1]) == 0
    assert cached_tokens(KEYS[1]) > 0
    with pytest.raises(openai.AuthenticationError):
        cached_tokens("not-a-key")


def test_the_kv_port_survives_a_flood_of_strangers(cluster):
    """The attack seen on 217846c: headers for unknown transfers made the decode node allocate
    each frame's claimed size and hold it (20 idle connections: 700 MB more RSS). Now 100
    connections send such headers (each claims two layers of cache) and 100 more stay silent;
    the node's memory and threads come back to where they were, and it still serves."""
    decode = cluster.decode[0]
    rss_before, threads_before = proc_status(decode, "VmRSS"), num_threads(decode)
    kv_address = ("127.0.0.1", decode.info["kv_port"])
    num_blocks = node_stats(decode).num_kv_blocks // 4
    shape = (2, num_blocks, 16, 3, 64)  # half a layer of SmolLM2's K and V: within the frame cap
    claimed = 2 * num_blocks * 16 * 3 * 64 * 4
    loud = [socket.create_connection(kv_address, timeout=30) for _ in range(100)]
    silent = [socket.create_connection(kv_address, timeout=30) for _ in range(100)]
    try:
        for s in loud:
            s.sendall(FrameHeader(FrameType.KV, os.urandom(16), 0, "float32", shape, claimed).pack())
        for s in loud:  # each closed by the node as soon as its header failed
            assert s.recv(1) == b""
        assert proc_status(decode, "VmRSS") < rss_before + (64 << 10)  # KiB: no claimed frame allocated
    finally:
        for s in loud + silent:
            s.close()
    assert wait_for(lambda: num_threads(decode) <= threads_before)
    rss_after = proc_status(decode, "VmRSS")
    print(f"decode node: {claimed * 100 >> 20} MiB claimed, RSS {rss_before >> 10} -> {rss_after >> 10} MiB, "
          f"threads {threads_before} -> {num_threads(decode)}")
    assert rss_after < rss_before + (64 << 10)
    client = openai.OpenAI(base_url=cluster.gateway_url, api_key=KEYS[0], max_retries=0, timeout=120)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
