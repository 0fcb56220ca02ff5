"""`pdserve up` as a user runs it: SmolLM2-135M on two prefill and two decode nodes, a local
redis-server and the HTTP gateway. Answers through the router equal the in-process engine's;
`pdserve generate --router` and the printed curl line get sensible answers; Ctrl-C stops
every process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from engine.engine import Engine
from engine.sampling_params import SamplingParams

from .serving import generate

CHATS = ["Name three primary colors.", "What is 2 + 2?", "Write one sentence about the sea."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def up():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--model", "smollm2-135m",
                             "--num-prefill", "2", "--num-decode", "2", "--port", str(port), "--http-port", "0",
                             "--no-sample"],
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
    log_dir = Path(re.search(r"logs: (\S+)", output).group(1))
    yield f"127.0.0.1:{port}", proc, log_dir, output
    if proc.poll() is None:
        proc.kill()
    for ready in log_dir.glob("*.ready.json"):  # never leave a node behind, whatever failed
        try:
            os.kill(json.loads(ready.read_text())["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_chats_through_the_cluster_equal_the_engine(up):
    address = up[0]
    engine = Engine(model="smollm2-135m")
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = engine.chat([[{"role": "user", "content": c}] for c in CHATS], params)
    for chat, want in zip(CHATS, expected):
        tokens, last, _ = generate(address, chat, params, chat=True)
        assert tokens == want.token_ids, (chat, want.text)


def test_generate_command_gets_a_sensible_answer(up):
    address = up[0]
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--router", address,
                             "What is the capital of France? Answer in one word."],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_the_printed_curl_line_gets_an_answer(up):
    output = up[3]
    url, body = re.search(r"curl (\S+) -H 'Content-Type: application/json' -d '(.+)'", output).groups()
    body = {**json.loads(body), "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_ctrl_c_stops_every_process(up):
    _, proc, log_dir, _ = up
    pids = [json.loads(f.read_text())["pid"] for f in log_dir.glob("*.ready.json")]
    assert len(pids) == 6  # router, gateway, two prefill, two decode
    assert (log_dir / "redis" / "redis.sock").exists()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (log_dir / "redis" / "redis.sock").exists()  # redis-server stopped too
