"""Every process's /metrics after a scripted workload (issue 33): each role exports only its own
families (service/metrics.py ROLES), every sample labelled with the model, and every counter
equals the true count: requests that ran to their length, that a stop token ended, that the
client cancelled, that were invalid; their prompt and generated tokens; the KV bytes moved.
Real processes on loopback serving `dummy:tiny`, always disaggregated; the oracle for the
token counts is the in-process engine."""

import concurrent.futures
import re
import urllib.request

import grpc
import httpx
import pytest

from pdserve.client import generate_request, stream
from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.service import metrics

from .serving import all_blocks_free, random_prompts, wait_for

MODEL = "dummy:tiny"
LENGTH = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


@pytest.fixture(scope="module")
def cluster():
    with Cluster(MODEL, 1, 1, gateway_port=0, router_args=["--disaggregation", "always"],
                 node_args=["--num-kv-blocks", "256"]) as c:
        yield c


def scrape(url: str) -> tuple[set[str], dict]:
    """(the family names its TYPE lines declare, {(sample name, frozenset of labels): value})."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return families, samples


def value(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples that carry `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def cancelled_after_first_tokens(address: str, prompt: list[int]) -> int:
    """Streams a long request and leaves once the decode node has sent tokens (its KV has
    landed and been counted: the first token alone is the prefill node's); the tokens seen."""
    call, seen = stream(address, generate_request(prompt, LONG), timeout=60), 0
    for response in call:
        seen += len(response.token_ids)
        if seen >= 2:
            call.close()
            return seen
    raise AssertionError("the stream ended")


def test_every_counter_equals_the_true_count(cluster):
    engine = Engine(model=MODEL, num_kv_blocks=256, max_model_len=2048)
    router = cluster.router_address
    # ran to their length
    lengths = random_prompts(40, [5, 16, 17, 40, 70])
    for prompt in lengths:
        assert sum(len(r.token_ids) for r in stream(router, generate_request(prompt, LENGTH), timeout=60)) == 8
    # ended by a stop token: the engine's third token, so the answer is 3 tokens long
    stopped = random_prompts(41, [9, 33])
    stop_params = []
    for prompt in stopped:
        [free] = engine.generate([prompt], LENGTH)
        stop_params.append(SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                          stop_token_ids=[free.token_ids[2]]))
    stopped_out = [c.token_ids for c in engine.generate(stopped, stop_params)]
    for prompt, params, want in zip(stopped, stop_params, stopped_out):
        got = [t for r in stream(router, generate_request(prompt, params), timeout=60) for t in r.token_ids]
        assert got == want
    # cancelled by the client after their first tokens from the decode node
    cancelled = random_prompts(42, [12, 50])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        seen = list(pool.map(lambda p: cancelled_after_first_tokens(router, p), cancelled))
    # invalid: refused by the router (gRPC) and by the gateway (HTTP 400)
    with pytest.raises(grpc.RpcError):
        list(stream(router, generate_request([5, 10**7], LENGTH), timeout=60))  # no such token
    gateway = cluster.gateway_url
    through_gateway = random_prompts(43, [7, 21])
    for prompt in through_gateway:
        reply = httpx.post(f"{gateway}/completions", timeout=60, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert httpx.post(f"{gateway}/completions", timeout=60, json={"model": MODEL, "prompt": [5],
                                                                   "max_tokens": -1}).status_code == 400
    router_metrics = f"http://127.0.0.1:{cluster.router.info['metrics_port']}/metrics"
    # every call has ended everywhere: the router's (the gauge falls after a call's last count)
    assert wait_for(lambda: all_blocks_free(cluster) and value(scrape(router_metrics)[1],
                                                                "pdserve_router_requests_in_flight") == 0, timeout=30)

    finished = lengths + stopped + through_gateway
    finished_out = [8] * len(lengths) + [len(t) for t in stopped_out] + [4] * len(through_gateway)
    every_prompt = finished + cancelled
    num_prompt_tokens = sum(len(p) for p in every_prompt)

    # the router: what clients saw
    _, r = scrape(router_metrics)
    assert value(r, "pdserve_requests_total", outcome="ok") == len(finished)
    assert value(r, "pdserve_requests_total", outcome="cancelled") == len(cancelled)
    assert value(r, "pdserve_requests_total", outcome="invalid") == 1
    assert value(r, "pdserve_request_success_total", finished_reason="length") == len(lengths) + len(through_gateway)
    assert value(r, "pdserve_request_success_total", finished_reason="stop") == len(stopped)
    assert value(r, "pdserve_request_success_total", finished_reason="abort") == len(cancelled)
    for name in ("pdserve_e2e_request_latency_seconds_count", "pdserve_time_to_first_token_seconds_count",
                 "pdserve_request_prompt_tokens_count", "pdserve_request_generation_tokens_count"):
        assert value(r, name) == len(every_prompt), name
    assert value(r, "pdserve_request_prompt_tokens_sum") == num_prompt_tokens
    generated = value(r, "pdserve_request_generation_tokens_sum") - sum(finished_out)
    assert sum(seen) <= generated <= len(cancelled) * LONG.max_tokens  # the cancelled: what they had

    # the prefill node: every prompt, prefilled once, its first token sampled there
    _, p = scrape(f"http://127.0.0.1:{cluster.prefill[0].info['metrics_port']}/metrics")
    assert value(p, "pdserve_requests_total", outcome="ok") == len(every_prompt)
    assert value(p, "pdserve_prefix_cache_queries_total") == num_prompt_tokens
    assert value(p, "pdserve_prompt_tokens_total") + value(p, "pdserve_prefix_cache_hits_total") == num_prompt_tokens
    assert value(p, "pdserve_generation_tokens_total") == len(every_prompt)
    for phase in ("queue", "prefill", "inference"):  # each prompt's phases here; it decodes nothing
        assert value(p, f"pdserve_request_{phase}_time_seconds_count") == len(every_prompt), phase
    assert value(p, "pdserve_request_decode_time_seconds_count") == 0

    # the decode node: every reservation looked up, the rest of each answer generated there
    _, d = scrape(f"http://127.0.0.1:{cluster.decode[0].info['metrics_port']}/metrics")
    assert value(d, "pdserve_requests_total", outcome="ok") == len(finished)  # 9 of 16 on 217846c
    assert value(d, "pdserve_requests_total", outcome="cancelled") == len(cancelled)
    assert value(d, "pdserve_prefix_cache_queries_total") == num_prompt_tokens
    assert value(d, "pdserve_prompt_tokens_total") == 0
    for phase, count in (("queue", 0), ("prefill", 0), ("decode", len(finished)), ("inference", len(finished))):
        assert value(d, f"pdserve_request_{phase}_time_seconds_count") == count, phase  # the KV came from elsewhere
    after_first = value(d, "pdserve_generation_tokens_total") - sum(n - 1 for n in finished_out)
    assert sum(n - 1 for n in seen) <= after_first <= len(cancelled) * (LONG.max_tokens - 1)
    sent = value(p, "pdserve_kv_transfer_bytes_total", direction="sent")
    assert sent > 0 and value(d, "pdserve_kv_transfer_bytes_total", direction="received") == sent
    assert value(d, "pdserve_kv_transfer_failures_total") == value(p, "pdserve_kv_transfer_failures_total") == 0

    # the gateway: its requests by status
    _, g = scrape(gateway.removesuffix("/v1") + "/metrics")
    assert value(g, "pdserve_http_requests_total", path="/v1/completions", status="200") == len(through_gateway)
    assert value(g, "pdserve_http_requests_total", path="/v1/completions", status="400") == 1


def test_each_role_exports_only_its_own_families_labelled_with_the_model(cluster):
    stream_done = list(stream(cluster.router_address, generate_request([5, 6, 7], LENGTH), timeout=60))
    assert stream_done[-1].finish_reason
    urls = {"router": f"http://127.0.0.1:{cluster.router.info['metrics_port']}/metrics",
            "prefill": f"http://127.0.0.1:{cluster.prefill[0].info['metrics_port']}/metrics",
            "decode": f"http://127.0.0.1:{cluster.decode[0].info['metrics_port']}/metrics",
            "gateway": cluster.gateway_url.removesuffix("/v1") + "/metrics"}
    for role, url in urls.items():
        families, samples = scrape(url)
        assert families == metrics.family_names(role), role
        assert samples and all(("model_name", MODEL) in labels for _, labels in samples), role
    assert "pdserve_redis_up" not in scrape(urls["decode"])[0]  # read 0 on the nodes with Redis up, before
