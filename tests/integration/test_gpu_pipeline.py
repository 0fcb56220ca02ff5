"""The disaggregated path on GPUs, `dummy:llama3-8b`: on a host of two GPUs prefill on cuda:0,
decode on cuda:1, the KV over the nccl connector (NVLink); on one GPU both nodes share it and
the KV goes over tcp, or is written in place by the prefill node (ipc: CUDA IPC). The oracle: the in-process engine on one GPU. Requests go one at a time,
so both sides run the same batch shapes and bf16 gives bit-equal logits; then 16 at once,
which must all complete and free every block.

Under load (the last test) batches form, grow and shrink while transfers land, so the cluster's
batch shapes differ from the engine's; in float32 those differences stay near 1e-6 and greedy
tokens must still equal the engine's, prompt by prompt."""

import concurrent.futures
import random

import pytest
import torch

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.cluster import Cluster

from .serving import all_blocks_free, generate, metric, wait_for

pytestmark = pytest.mark.gpu
MODEL = "dummy:llama3-8b"
ENGINE_ARGS = {"num_kv_blocks": 1024, "max_model_len": 4096, "max_num_batched_tokens": 4096}
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def flags(args: dict) -> list[str]:
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def check_pipeline(prefill_args: list[str], decode_args: list[str]) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 128000) for _ in range(rng.randrange(16, 1500))] for _ in range(16)]
    reference = Engine(model=MODEL, device="cuda:0", **ENGINE_ARGS)
    expected = [reference.generate([p], PARAMS)[0].token_ids for p in prompts]
    del reference
    torch.cuda.empty_cache()
    with Cluster(MODEL, 1, 1, node_args=flags(ENGINE_ARGS), prefill_args=prefill_args,
                 decode_args=decode_args).start(timeout=600) as cluster:
        for prompt, want in zip(prompts, expected):
            tokens, last, _ = generate(cluster.router_address, prompt, PARAMS)
            assert tokens == want
            assert last.timings.num_attempts == 1  # no retry: the transfer itself worked
        in_place = metric(cluster.decode[0], "pdserve_kv_transfers_in_place_total")
        assert in_place == (len(prompts) if "ipc" in decode_args else 0)  # ipc: every one written in place
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda p: generate(cluster.router_address, p, PARAMS), prompts))
        assert all(len(tokens) == PARAMS.max_tokens for tokens, _, _ in results)
        matching = sum(tokens == want for (tokens, _, _), want in zip(results, expected))
        print(f"16 concurrent requests: {matching}/16 equal the one-at-a-time tokens")
        assert wait_for(lambda: all_blocks_free(cluster))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (nvidia-h200-x2)")
def test_two_gpu_pipeline_over_nccl_equals_the_engine_on_one_gpu():
    check_pipeline(["--device", "cuda:0"], ["--device", "cuda:1", "--kv-connector", "nccl"])


@pytest.mark.parametrize("connector", ["tcp", "ipc"])
def test_one_gpu_pipeline_equals_the_engine(connector):
    check_pipeline(["--device", "cuda:0"], ["--device", "cuda:0", "--kv-connector", connector])


@pytest.mark.parametrize("connector", ["tcp", "ipc"])
def test_greedy_tokens_under_load_equal_the_engine(connector):
    """48 requests of 16-1500 prompt tokens and 8-40 output tokens, 16 at a time
    through a one-GPU cluster (float32, `dummy:llama3.2-1b`), each equal to the engine's tokens
    for its prompt alone; every request served on its first attempt, every block freed."""
    model, args = "dummy:llama3.2-1b", {**ENGINE_ARGS, "dtype": "float32"}
    rng = random.Random(1)
    work = [([rng.randrange(100, 128000) for _ in range(rng.randrange(16, 1500))],
             SamplingParams(temperature=0, max_tokens=rng.randrange(8, 41), ignore_eos=True)) for _ in range(48)]
    reference = Engine(model=model, device="cuda:0", **args)
    expected = [reference.generate([prompt], params)[0].token_ids for prompt, params in work]
    del reference
    torch.cuda.empty_cache()
    with Cluster(model, 1, 1, node_args=flags(args), prefill_args=["--device", "cuda:0"],
                 decode_args=["--device", "cuda:0", "--kv-connector", connector]).start(timeout=600) as cluster:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda w: generate(cluster.router_address, *w), work))
        mismatched = [i for i, ((tokens, _, _), want) in enumerate(zip(results, expected)) if tokens != want]
        assert not mismatched, f"{len(mismatched)}/48 differ from the engine's tokens: {mismatched}"
        assert all(last.timings.num_attempts == 1 for _, last, _ in results)
        assert wait_for(lambda: all_blocks_free(cluster))
