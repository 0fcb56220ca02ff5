"""TLS on every port (service/tls.py): a cluster of real processes (gateway, router, one prefill
and one decode node serving `dummy:tiny`, always disaggregated so the KV crosses the tcp
connector) with certificates from a throwaway CA. Answers over HTTPS and gRPC equal the
in-process engine's; a client that speaks plain text gets nowhere, on any port."""

import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.request

import grpc
import httpx
import openai
import pytest
import trustme

from pdserve import client as pdserve_client
from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.frame import FrameHeader, FrameType
from pdserve.service.tls import Tls

from .serving import all_blocks_free, random_prompts, wait_for

MODEL = "dummy:tiny"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def tls(ca, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost", "pdserve.internal")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return Tls(str(folder / "cert.pem"), str(folder / "key.pem"), str(folder / "ca.pem"))


@pytest.fixture(scope="module")
def cluster(tls):
    with Cluster(MODEL, 1, 1, gateway_port=0, tls=tls, router_args=["--disaggregation", "always"],
                 node_args=["--num-kv-blocks", "128"]) as c:
        yield c


@pytest.fixture(scope="module")
def engine():
    return Engine(model=MODEL, num_kv_blocks=128, max_model_len=2048)


def test_https_answers_equal_the_engine(cluster, ca, engine):
    prompts = random_prompts(7, [5, 16, 40])
    expected = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client = openai.OpenAI(base_url=cluster.gateway_url, api_key="none", max_retries=0,
                           http_client=httpx.Client(verify=context, timeout=60))
    assert cluster.gateway_url.startswith("https://")
    for prompt, want in zip(prompts, expected):
        done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"return_token_ids": True, "ignore_eos": True})
        assert done.choices[0].token_ids == want
    assert wait_for(lambda: all_blocks_free(cluster))


def test_grpc_with_the_ca_equals_the_engine(cluster, tls, engine, monkeypatch):
    """`pdserve generate` and other clients: $PDSERVE_TLS_CA alone makes them dial TLS."""
    monkeypatch.setenv("PDSERVE_TLS_CA", tls.ca_file)
    [prompt] = random_prompts(8, [33])
    [want] = engine.generate([prompt], GREEDY)
    request = pdserve_client.generate_request(prompt, GREEDY)
    tokens = [t for r in pdserve_client.stream(cluster.router_address, request, timeout=60) for t in r.token_ids]
    assert tokens == want.token_ids


def test_the_health_probe_speaks_tls_and_checks_the_name(cluster, tls):
    """`pdserve health`, the chart's probe: $PDSERVE_TLS_SERVER_NAME is the name the certificate
    must carry, whatever address is dialled."""
    def probe(server_name: str) -> subprocess.CompletedProcess:
        environment = {**os.environ, **tls.env(), "PDSERVE_TLS_SERVER_NAME": server_name}
        return subprocess.run([sys.executable, "-m", "pdserve.cli", "health", cluster.router_address],
                              env=environment, capture_output=True, text=True, timeout=60)

    named = probe("pdserve.internal")
    assert named.returncode == 0 and named.stdout.strip() == "SERVING", named.stdout + named.stderr
    stranger = probe("someone.else")
    assert stranger.returncode == 1 and "UNAVAILABLE" in stranger.stdout


def test_metrics_are_served_over_https_and_the_kv_crossed_tls(cluster, ca, tls, monkeypatch):
    monkeypatch.setenv("PDSERVE_TLS_CA", tls.ca_file)
    request = pdserve_client.generate_request(random_prompts(9, [40])[0], GREEDY)
    assert len([r for r in pdserve_client.stream(cluster.router_address, request, timeout=60)]) > 0
    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"https://127.0.0.1:{cluster.decode[0].info['metrics_port']}/metrics"
    body = urllib.request.urlopen(url, timeout=10, context=context).read().decode()
    received = re.search(r'pdserve_kv_transfer_bytes_total\{direction="received",model_name="dummy:tiny"\} (\S+)', body)
    assert received and float(received.group(1)) > 0  # the KV of that request, at least


def test_plain_text_gets_nowhere(cluster):
    for process in [cluster.router, *cluster.prefill, *cluster.decode]:
        with grpc.insecure_channel(process.address) as channel:
            call = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                       response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):
        httpx.get(cluster.gateway_url.replace("https://", "http://") + "/models", timeout=5)
    kv = socket.create_connection(("127.0.0.1", cluster.decode[0].info["kv_port"]), timeout=10)
    kv.sendall(FrameHeader(FrameType.KV, b"\0" * 16, 0, "float32", (2, 1, 16, 2, 16), 4096).pack())
    try:  # the handshake fails: perhaps an alert, then the receiver hangs up
        while kv.recv(4096):
            pass
    except ConnectionResetError:
        pass
    kv.close()
    assert all(p.popen.poll() is None for p in cluster.processes)


def test_the_environment_is_checked(tmp_path, monkeypatch, tls):
    for name, value in tls.env().items():
        monkeypatch.setenv(name, value)
    assert Tls.from_env() == tls and tls.kv_server() is not None and tls.kv_client() is not None
    monkeypatch.setenv("PDSERVE_TLS_KV", "off")  # the KV connector plain text, the rest TLS
    plain_kv = Tls.from_env()
    assert plain_kv.serves and plain_kv.kv_server() is None and plain_kv.kv_client() is None
    monkeypatch.setenv("PDSERVE_TLS_KV", "maybe")
    with pytest.raises(ValueError, match="on or off"):
        Tls.from_env()
    monkeypatch.delenv("PDSERVE_TLS_KV")
    monkeypatch.delenv("PDSERVE_TLS_KEY", raising=False)
    with pytest.raises(ValueError, match="both"):
        Tls.from_env()
    monkeypatch.setenv("PDSERVE_TLS_KEY", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="no file"):
        Tls.from_env()
