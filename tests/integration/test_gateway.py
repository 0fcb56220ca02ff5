"""The OpenAI API through real processes (gateway, router, one prefill and one decode node
serving SmolLM2-135M), called with the official `openai` client. Oracle: the in-process
Engine's greedy text on the same prompts."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.cluster import Cluster
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.api_fields import IMPLEMENTED, NOT_IMPLEMENTED
from pdserve.service.convert import sampling_to_proto

from .serving import all_blocks_free, wait_for

MODEL, KEY = "smollm2-135m", "test-key"
DECODE_BLOCKS = 48  # room for two 260-token prompts (17 blocks each) and their output, not three
HOLD_S = 600  # a reservation whose KV never comes holds its blocks this long
# no admission queue: a request that does not fit is refused at once (429) instead of waiting
NO_QUEUE = ["--max-queued-requests", "0"]


@pytest.fixture(scope="module")
def cluster():
    with Cluster(MODEL, 1, 1, gateway_port=0, gateway_env={"PDSERVE_API_KEY": KEY},
                 decode_args=["--num-kv-blocks", str(DECODE_BLOCKS), "--reservation-timeout-s", str(HOLD_S), *NO_QUEUE]) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.gateway_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    return Engine(model=MODEL)


def greedy(max_tokens):
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def test_completions_streaming_or_not_equal_the_engine(client, engine):
    prompt = "The three most useful things to pack for a hike are"
    [want] = engine.generate([prompt], greedy(20))
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert done.choices[0].text == want.text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert done.choices[0].finish_reason == "length" == [c for c in chunks if c.choices][-1].choices[0].finish_reason
    assert done.usage.prompt_tokens == len(engine.tokenizer.encode(prompt)) and done.usage.completion_tokens == 20
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_return_token_ids_gives_the_engine_token_ids(client, engine):
    """vLLM's extension: each choice (and each streamed chunk's choice) carries its token ids."""
    prompt = [1, 504, 3045, 2136, 282, 253, 3373]
    [want] = engine.generate([prompt], greedy(12))
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"return_token_ids": True})
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True})
    assert done.choices[0].token_ids == want.token_ids
    assert [t for c in chunks for t in c.choices[0].token_ids] == want.token_ids
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert "token_ids" not in plain.choices[0].model_extra  # only when asked for


def test_chat_streaming_or_not_equal_the_engine(client, engine):
    messages = [{"role": "user", "content": "Name three primary colors."}]
    [want] = engine.chat([messages], greedy(24))
    done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                                 temperature=0, stream=True))
    assert done.choices[0].message.content == want.text and done.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text


def test_stop_strings_cut_the_text_exactly(client, engine):
    prompt = "Here is a list of fruits: apples, bananas,"
    [full] = engine.generate([prompt], greedy(32))
    stop = full.text.split()[2]  # a word from the middle of the answer
    expected = full.text[:full.text.index(stop)]
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stop=[stop])
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                              stop=stop, stream=True))
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_repeated_prefix_is_served_from_the_cache(client):
    system = "You are a careful assistant. " * 20  # well over a few KV blocks
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hi."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 100
    assert second.usage.prompt_tokens_details.cached_tokens >= 96


def test_errors_come_as_the_matching_openai_exceptions(cluster, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="n: must be between 1 and 16"):
        client.completions.create(model=MODEL, prompt="x", n=17)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x")
    wrong = openai.OpenAI(base_url=cluster.gateway_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.completions.create(model=MODEL, prompt="x")
    assert httpx.get(f"{cluster.gateway_url}/models").status_code == 401  # /v1/* needs the key
    assert httpx.get(cluster.gateway_url.removesuffix("/v1") + "/health").status_code == 200


def test_a_full_cluster_answers_429(cluster, client):
    """Two reservations made on the decode node itself hold its blocks by construction (their KV
    never comes, and they outlive the test); a third prompt of the same size cannot fit, and
    with no room in the admission queue it is refused. Once they are cancelled, every block is
    free again."""
    params = sampling_to_proto(SamplingParams(temperature=0, max_tokens=60))
    with grpc.insecure_channel(cluster.decode[0].address) as channel:
        stub = pb_grpc.DecodeServiceStub(channel)
        holds = [stub.Decode(pb.DecodeRequest(request_id=f"hold-{i}", prompt_token_ids=[100 + i] * 260,
                                              sampling=params), timeout=HOLD_S, metadata=cluster.decode[0].metadata)
                 for i in range(2)]
        try:
            for hold in holds:
                assert next(hold).HasField("ticket")  # its blocks are reserved
            with pytest.raises(openai.RateLimitError, match="full"):
                client.completions.create(model=MODEL, prompt=[300] * 260, max_tokens=1)
        finally:
            for hold in holds:
                hold.cancel()
    assert wait_for(lambda: all_blocks_free(cluster), timeout=30)


def test_no_router_answers_503(tmp_path):
    ready = tmp_path / "gateway.json"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "gateway", "--port", "0",
                             "--router", "127.0.0.1:1", "--served-model-name", MODEL,
                             "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(ready.exists, timeout=60)
        port = json.loads(ready.read_text())["port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as failure:
            client.completions.create(model=MODEL, prompt="x")
        assert failure.value.status_code == 503
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503
    finally:
        proc.terminate()
        proc.wait(30)


def test_models_and_metrics(cluster, client):
    [model] = client.models.list().data
    assert model.id == MODEL and model.model_extra["max_model_len"] == DECODE_BLOCKS * 16
    metrics = httpx.get(cluster.gateway_url.removesuffix("/v1") + "/metrics").text
    assert f'pdserve_http_requests_total{{model_name="{MODEL}",path="/v1/completions",status="200"}}' in metrics


# every field either endpoint implements or knows, and one it does not
FIELDS = sorted(IMPLEMENTED[True] | IMPLEMENTED[False] | set(NOT_IMPLEMENTED) | {"an_unknown_field"})
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "é" * 40]))
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(), TEXT,
                 st.lists(st.integers(-5, 2**40), max_size=4), st.lists(TEXT, max_size=3),
                 st.dictionaries(TEXT, st.one_of(st.integers(), TEXT), max_size=2), st.just([]),
                 st.lists(st.dictionaries(st.sampled_from(["role", "content", "type", "name"]), TEXT, max_size=3),
                          max_size=2))
STATUSES: dict[int, int] = {}  # the fuzz's answers by status, printed by the test after it
LENGTHS = ("max_tokens", "max_completion_tokens", "min_tokens", "n")


def _short(bad: dict) -> dict:
    """Lengths a valid request would run long with (5 .. 2**31) become 4: the fuzz is about
    input handling, not about generating (out-of-range values still reach the checks)."""
    return {k: 4 if k in LENGTHS and type(v) is int and 4 < v < 2**31 else v for k, v in bad.items()}


BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JUNK, min_size=1, max_size=4).map(
        lambda bad: json.dumps({"model": MODEL, "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 1, **_short(bad)}).encode()),
    st.binary(max_size=64), st.just(b"[" * 5000), st.just(b'{"model": "' + MODEL.encode() + b'", "messages": []}'))


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=BODIES, chat=st.booleans())
def test_malformed_requests_never_get_a_5xx(cluster, body, chat):
    url = f"{cluster.gateway_url}/{'chat/completions' if chat else 'completions'}"
    try:  # a valid body that asks for many tokens may run long: the client gives up (and cancels)
        reply = httpx.post(url, content=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=3)
    except httpx.TimeoutException:
        STATUSES[0] = STATUSES.get(0, 0) + 1
        return
    STATUSES[reply.status_code] = STATUSES.get(reply.status_code, 0) + 1
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert error["message"] and error["type"]


def test_the_gateway_is_alive_after_the_fuzz(cluster, client):
    print("fuzz answers by status (0: the client gave up):", dict(sorted(STATUSES.items())))
    assert httpx.get(cluster.gateway_url.removesuffix("/v1") + "/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert wait_for(lambda: all_blocks_free(cluster), timeout=30)


def test_the_gateway_stays_up_and_a_client_that_leaves_frees_its_blocks(cluster, client):
    with httpx.stream("POST", f"{cluster.gateway_url}/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 500,
                            "stream": True}, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
    # the client hung up after one chunk: the gateway cancels, both nodes free the blocks
    assert wait_for(lambda: all_blocks_free(cluster), timeout=30)
    time.sleep(0.5)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_the_readme_examples_work(cluster):
    """The README's curl line and every Python snippet as written (the openai one pointed at
    this cluster's gateway and key) give sensible answers."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    url, body = re.search(r"curl (http://\S+/v1/chat/completions) .*?-d '(.+?)'", readme, re.S).groups()
    url = url.replace("http://127.0.0.1:8000/v1", cluster.gateway_url)
    reply = httpx.post(url, content=body, headers={"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {KEY}"}, timeout=120)
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    snippets = re.findall(r"```python\n(.+?)```", readme, re.S)
    assert len(snippets) == 2  # the openai client and the in-process engine; both ask for colors
    for snippet in snippets:
        snippet = snippet.replace("http://127.0.0.1:8000/v1", cluster.gateway_url).replace('"none"', repr(KEY))
        printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
        assert printed.returncode == 0, printed.stderr
        assert sum(color in printed.stdout.lower() for color in ("red", "blue", "yellow")) >= 2, printed.stdout


def test_an_error_mid_stream_is_an_error_chunk_then_done():
    """The only decode node dies mid-stream and does not come back within the router's
    `--resume-wait-s`: nowhere to resume, so the stream ends in an error."""
    with Cluster("dummy:tiny", 1, 1, gateway_port=0, router_args=["--resume-wait-s", "1"]) as tiny:
        client = openai.OpenAI(base_url=tiny.gateway_url, api_key="none", max_retries=0)
        stream = client.completions.create(model="dummy:tiny", prompt=[5, 6, 7], max_tokens=1500,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        tiny.decode[0].popen.kill()
        with pytest.raises(openai.APIError, match="UNAVAILABLE|decode"):
            for _ in chunks:
                pass
        with httpx.stream("POST", f"{tiny.gateway_url}/completions", json={
                "model": "dummy:tiny", "prompt": [5], "max_tokens": 2, "stream": True}) as reply:
            assert reply.status_code == 503  # and with no node left, the error comes before the stream


@pytest.mark.parametrize("field", ["prompt", "stop", "cache_salt", "messages"])
def test_text_that_is_not_unicode_is_400(cluster, field):
    body = {"model": MODEL, "max_tokens": 2, "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}
    value = "a\ud800b"  # a lone surrogate: valid JSON escape, not valid Unicode
    body[field] = [{"role": "user", "content": value}] if field == "messages" else value
    chat = field == "messages"
    reply = httpx.post(f"{cluster.gateway_url}/{'chat/completions' if chat else 'completions'}",
                       content=json.dumps(body).encode(), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert reply.status_code == 400 and "Unicode" in reply.json()["error"]["message"]


def test_auth_takes_the_scheme_in_any_case_and_says_how_to_authenticate(cluster):
    url = f"{cluster.gateway_url}/models"
    assert httpx.get(url, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    for header in (KEY, f"Basic {KEY}", f"Bearer {KEY}x", ""):
        reply = httpx.get(url, headers={"Authorization": header})
        assert reply.status_code == 401 and reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_duplicate_request_id_is_refused_and_leaves_the_first_stream_alone(cluster, engine):
    prompt = [1, 504, 3045, 2136, 282, 253]
    [want] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    request = pb.GenerateRequest(request_id="same-id", token_ids=pb.TokenIds(ids=prompt), sampling=sampling_to_proto(
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
    with grpc.insecure_channel(cluster.router_address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        first = stub.Generate(request, timeout=120)
        tokens = list(next(first).token_ids)  # the first stream is open
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request, timeout=30))
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        tokens += [t for response in first for t in response.token_ids]
    assert tokens == want.token_ids


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(client):
    with pytest.raises(openai.BadRequestError, match="cannot fit the context"):
        client.completions.create(model=MODEL, prompt="x" * 400_000, max_tokens=2)
