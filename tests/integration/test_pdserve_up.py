"""`pdserve up` as a user runs it: SmolLM2-135M on two prefill and two decode nodes, a local
redis-server and the HTTP gateway. Answers through the router equal the in-process engine's;
`pdserve generate --router` and the printed curl line get sensible answers; the API key
reaches the gateway without showing on any command line; Ctrl-C stops every process."""

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

from .serving import generate

CHATS = ["Name three primary colors.", "What is 2 + 2?", "Write one sentence about the sea."]
KEY = "up-test-key-7f3a"


def start_up(*args: str):
    """`pdserve up` with these flags, read until it says it is up: (router address, the
    process, its log directory, what it printed). `stop_up` ends it."""
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--model", "smollm2-135m",
                             "--port", "0", "--http-port", "0", "--no-sample", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "stop: Ctrl-C" in line:
            break
    output = "".join(lines)
    assert "pdserve is up" in output, output
    # keep reading what it prints, so that a full pipe can never block it
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    address = re.search(r"router at (\S+) ", output).group(1)
    return address, proc, Path(re.search(r"logs: (\S+)", output).group(1)), output


def processes_naming(text: str) -> list[int]:
    """The pids whose command line has `text` in it (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def stop_up(proc, log_dir: Path) -> None:
    """Ctrl-C, as a user stops it (it stops its nodes and its redis-server); then, whatever
    failed, no node and no redis-server of it is left behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    pids = [json.loads(ready.read_text())["pid"] for ready in log_dir.glob("*.ready.json")]
    for pid in pids + processes_naming(str(log_dir)):  # the redis-server's socket lives in log_dir
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port_run(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 40000)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    stack.enter_context(socket.create_server(("127.0.0.1", port)))
            return base
        except OSError:
            continue


BASE_PORT = free_port_run(13)  # 4 nodes x (gRPC, metrics) + 2 KV + the router's metrics


@pytest.fixture(scope="module")
def up():
    address, proc, log_dir, output = start_up("--num-prefill", "2", "--num-decode", "2", "--api-key", KEY,
                                              "--base-port", str(BASE_PORT))
    yield address, proc, log_dir, output
    stop_up(proc, log_dir)


def test_the_banner_lists_every_endpoint_on_the_base_ports(up):
    """Every gRPC, KV and metrics port of every process, from --base-port up; each /metrics answers."""
    output = up[3]
    endpoints = dict(re.findall(r"^    (\S.*?\S)\s{2,}(\S+)$", output, re.MULTILINE))
    nodes = ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    for i, name in enumerate(nodes):
        assert endpoints[f"{name} gRPC"] == f"127.0.0.1:{BASE_PORT + 3 * i}"
        assert endpoints[f"{name} metrics"] == f"http://127.0.0.1:{BASE_PORT + 3 * i + 1}/metrics"
    assert endpoints["decode-0 KV"] == f"127.0.0.1:{BASE_PORT + 3 * 2 + 2}"
    assert endpoints["router metrics"] == f"http://127.0.0.1:{BASE_PORT + 12}/metrics"
    assert endpoints["router gRPC"] == up[0]
    for what, url in endpoints.items():
        if what.endswith("metrics"):
            assert "model_name=" in urllib.request.urlopen(url, timeout=10).read().decode(), what


def test_chats_through_the_cluster_equal_the_engine(up):
    address = up[0]
    engine = Engine(model="smollm2-135m")
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = engine.chat([[{"role": "user", "content": c}] for c in CHATS], params)
    for chat, want in zip(CHATS, expected):
        tokens, last, _ = generate(address, chat, params, chat=True, api_key=KEY)
        assert tokens == want.token_ids, (chat, want.text)


def test_generate_command_gets_a_sensible_answer(up):
    address = up[0]
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--router", address,
                             "What is the capital of France? Answer in one word."],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PDSERVE_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_the_printed_curl_line_gets_an_answer(up):
    output = up[3]
    url, key, body = re.search(r"curl (\S+) -H 'Content-Type: application/json' "
                               r"-H 'Authorization: Bearer (\S+)' -d '(.+)'", output).groups()
    assert key == KEY
    body = {**json.loads(body), "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    headers = {"Content-Type": "application/json"}
    with pytest.raises(urllib.error.HTTPError) as refused:  # the key is required
        urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers), timeout=120)
    assert refused.value.code == 401
    request = urllib.request.Request(url, json.dumps(body).encode(), {**headers, "Authorization": f"Bearer {key}"})
    answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_the_api_key_is_on_no_command_line(up):
    _, proc, log_dir, _ = up
    pids = [json.loads(f.read_text())["pid"] for f in log_dir.glob("*.ready.json")]
    assert len(pids) == 6
    for pid in pids:
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_ctrl_c_stops_every_process():
    """A cluster of its own (the other tests share one), stopped with Ctrl-C."""
    _, proc, log_dir, _ = start_up("--num-prefill", "1", "--num-decode", "1")
    try:
        pids = [json.loads(f.read_text())["pid"] for f in log_dir.glob("*.ready.json")]
        assert len(pids) == 4  # router, gateway, a prefill and a decode node
        assert (log_dir / "redis" / "redis.sock").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not (log_dir / "redis" / "redis.sock").exists()  # redis-server stopped too
    finally:
        stop_up(proc, log_dir)
