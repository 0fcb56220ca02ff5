"""The `pdserve` command as a user runs it: a real subprocess against the in-process engine."""

import os
import subprocess
import sys

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

PDSERVE = [sys.executable, "-m", "pdserve.cli"]


def test_generate_streams_the_engines_greedy_answer():
    question = "What is the capital of France?"
    run = subprocess.run(PDSERVE + ["generate", "--max-tokens", "12", question],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    engine = Engine(model="smollm2-135m")
    (expected,) = engine.chat([[{"role": "user", "content": question}]],
                              SamplingParams(temperature=0, max_tokens=12))
    assert run.stdout.strip() == expected.text.strip()
    assert "Paris" in run.stdout


def test_flags_and_environment_errors_are_clear():
    bad_model = subprocess.run(PDSERVE + ["generate", "--model", "dummy:nope", "hi"],
                               capture_output=True, text=True, timeout=120)
    assert bad_model.returncode == 2 and "dummy takes a preset" in bad_model.stderr
    bad_env = subprocess.run(PDSERVE + ["up"], capture_output=True, text=True, timeout=120,
                             env={"PDSERVE_BLOCK_SIZE": "abc", "PATH": ""})
    assert bad_env.returncode == 2 and "PDSERVE_BLOCK_SIZE" in bad_env.stderr
    zero = subprocess.run(PDSERVE + ["generate", "--block-size", "0", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert zero.returncode == 2 and "block_size must be >= 1" in zero.stderr


def test_up_spreads_nodes_over_the_devices_given():
    from pdserve.cli import node_devices

    assert node_devices("cpu", 3) == ["cpu"] * 3
    assert node_devices("cuda:0, cuda:1", 3) == ["cuda:0", "cuda:1", "cuda:0"]  # prefill first
    with pytest.raises(ValueError, match="empty"):
        node_devices(" , ", 2)


def test_up_splits_the_gpu_share_between_nodes_on_one_gpu():
    from pdserve.cli import node_device_args

    config = EngineConfig(device="cuda", gpu_memory_utilization=0.9)
    assert node_device_args(config, ["cuda:0", "cuda:1", "cuda:0"]) == [
        ["--device", "cuda:0", "--gpu-memory-utilization", "0.4500"], ["--device", "cuda:1"],
        ["--device", "cuda:0", "--gpu-memory-utilization", "0.4500"]]
    fixed = config.replace(kv_cache_memory_gb=4.0)  # a fixed cache size is each node's own
    assert node_device_args(fixed, ["cuda:0", "cuda:0"]) == [["--device", "cuda:0"]] * 2


def test_up_splits_the_cores_between_cpu_nodes(monkeypatch):
    from pdserve.cli import node_device_args

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    config = EngineConfig(device="cpu")
    assert node_device_args(config, ["cpu"] * 3) == [["--device", "cpu", "--num-threads", "2"]] * 3
    assert node_device_args(config, ["cpu"] * 16) == [["--device", "cpu", "--num-threads", "1"]] * 16
    assert node_device_args(config.replace(num_threads=4), ["cpu"] * 2) == [["--device", "cpu"]] * 2
