"""A router killed mid-stream loses no stream (issue 32): the gateway resumes each of its streams
on the other router, after the tokens the client has, so the client's text equals an undisturbed
run's (the in-process engine's greedy text) with no gap and no duplicate. Real processes: the
gateway over two routers, one prefill and one decode node serving SmolLM2-135M."""

import concurrent.futures
import signal
import threading
import time

import openai
import pytest

from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

from .serving import all_blocks_free, wait_for

MODEL, MAX_TOKENS = "smollm2-135m", 120
PROMPTS = [f"Write a long story about a {animal} who learns to" for animal in
           ("cat", "dog", "fox", "owl", "bear", "wolf", "horse", "crow")]


@pytest.fixture(scope="module")
def cluster():
    with Cluster(MODEL, 1, 1, gateway_port=0, num_routers=2) as c:
        yield c


def test_a_router_killed_mid_stream_loses_no_stream(cluster):
    [want] = [Engine(model=MODEL).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                    ignore_eos=True))]
    client = openai.OpenAI(base_url=cluster.gateway_url, api_key="none", max_retries=0, timeout=300)
    started = [threading.Event() for _ in PROMPTS]
    killed_at: list[float] = []

    def run(i: int):
        text, times, finish = "", [], None
        for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True}):
            text += chunk.choices[0].text
            times.append(time.monotonic())
            finish = chunk.choices[0].finish_reason or finish
            if len(times) >= 2:
                started[i].set()
        return text, times, finish

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(run, i) for i in range(len(PROMPTS))]
        assert all(event.wait(120) for event in started)  # every stream is under way (half on each router)
        victim = cluster.routers[0]
        victim.popen.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())
        results = [f.result(timeout=300) for f in futures]
    resumed = [times for _, times, _ in results if times[-1] > killed_at[0]]
    assert resumed  # streams were still running when the router died
    for (text, times, finish), expected in zip(results, want):
        assert text == expected.text and finish == "length"
    gaps = [max(b - a for a, b in zip(times, times[1:])) for _, times, _ in results]
    print(f"{len(resumed)} of {len(PROMPTS)} streams ran past the kill; longest gap {max(gaps):.2f}s")
    assert "resuming after" in cluster.gateway.log_file.read_text()
    assert wait_for(lambda: all_blocks_free(cluster), timeout=30)
