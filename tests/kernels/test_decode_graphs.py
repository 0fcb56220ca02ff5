"""Decode CUDA graphs (engine/cuda_graphs.py) against the eager engine: the same greedy tokens,
nothing captured or compiled after start-up, and the KV cache sized from the GPU's share."""

import pytest
import torch

from pdserve.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kernels.compile_count import num_compiled_kernels
from tests.kernels.paged_inputs import rel_err
from tests.unit.test_async_scheduling import (check_async_matches_sync, check_logprobs_and_penalties_keep_the_look_ahead,
                                              count_launches)


def _prompts(num, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 15, 16, 17, 33, 2, 50, 7, 120, 64, 3, 90, 31, 8, 200, 47][:num]
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _generate(engine, prompts, max_tokens):
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    results = engine.generate(prompts, params)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    return results


def count_runs(graphs) -> list[int]:
    """The batch size of every later `graphs.run`, appended as it happens."""
    sizes, run = [], graphs.run
    graphs.run = lambda batch, input_ids=None: sizes.append(len(batch.seq_lens)) or run(batch, input_ids)
    return sizes


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]


def test_padded_decode_path_matches_eager_cpu():
    """What a graph replays (static buffers, padded batch, padding rows that write nothing),
    run eagerly in the Triton interpreter: the same logits and tokens as the flat eager step,
    while requests finish and the batch shrinks; 5 running decodes, beyond the largest size
    (4), go eagerly."""
    prompts = _prompts(7, 512)
    max_tokens = [2, 3, 4, 5, 6, 7, 8]
    kw = dict(model="dummy:tiny", device="cpu", attention_backend="triton", num_kv_blocks=64,
              max_num_batched_tokens=64, keep_logits=True)
    eager = _generate(Engine(**kw), prompts, max_tokens)
    padded, calls = _generate_padded(Engine(**kw), prompts, max_tokens)
    assert [r.token_ids for r in padded] == [r.token_ids for r in eager]
    worst = max(rel_err(x, y) for a, b in zip(padded, eager) for x, y in zip(a.logits, b.logits))
    assert worst < 1e-5, worst
    assert calls[0] == 4 and sorted(set(calls)) == [1, 2, 3, 4], calls  # 3: padded to 4
    # launched ahead (keep_logits off): inputs come from the step in flight, on the device
    engine = Engine(**{**kw, "keep_logits": False})
    followed = count_launches(engine)
    ahead, _ = _generate_padded(engine, prompts, max_tokens)
    assert [r.token_ids for r in ahead] == [r.token_ids for r in eager]
    assert sum(followed) >= 3, followed


def _generate_padded(engine, prompts, max_tokens):
    """`_generate` with a CPU DecodeGraphs of sizes up to 4 (the padded path, run eagerly)."""
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.backend, 4, engine.max_model_len,
                                 runner.block_size, runner.device)
    calls = count_runs(runner.graphs)
    return _generate(engine, prompts, max_tokens), calls


@pytest.mark.gpu
def test_graphs_match_eager_and_nothing_is_captured_or_compiled_in_steady_state():
    prompts = _prompts(16, 128000)
    max_tokens = [16 + 3 * i for i in range(16)]
    kw = dict(model="dummy:llama3.2-1b", device="cuda", num_kv_blocks=2048, max_num_seqs=64,
              max_num_batched_tokens=512)
    eager = _generate(Engine(enforce_eager=True, async_scheduling=False, **kw), prompts, max_tokens)
    engine = Engine(**kw)  # graphs, async scheduling
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.num_captures == len(graph_batch_sizes(64))
    followed = count_launches(engine)
    warm = _generate(engine, prompts, max_tokens)
    assert [r.token_ids for r in warm] == [r.token_ids for r in eager]  # 16 prompts, greedy
    assert sum(followed) > 40  # decode steps launched behind steps in flight
    compiled, captures = num_compiled_kernels(), graphs.num_captures
    replays = count_runs(graphs)
    again = _generate(engine, _prompts(16, 128000, seed=1), max_tokens[::-1])
    assert len(again) == 16 and len(replays) > 40  # decode steps of 16..1 sequences
    assert (num_compiled_kernels(), graphs.num_captures) == (compiled, captures)
    print(f"{captures} graphs, {compiled} compiled Triton kernels, {len(replays)} replays, none added")


@pytest.mark.gpu
def test_kv_cache_takes_the_gpu_share():
    total = torch.cuda.mem_get_info()[1]
    engine = Engine(model="dummy:llama3.2-1b", device="cuda", gpu_memory_utilization=0.5)
    kv_bytes = engine.runner.num_blocks * engine.runner.block_bytes()
    used = torch.cuda.memory_reserved()
    assert 0.3 * total < used <= 0.5 * total, (used, total)
    assert kv_bytes > 0.2 * total
    del engine
    with pytest.raises(ValueError, match="no room for the KV cache"):
        Engine(model="dummy:llama3.2-1b", device="cuda", gpu_memory_utilization=0.02)


@pytest.mark.gpu
def test_async_scheduling_gives_the_tokens_of_one_step_at_a_time_on_gpu():
    """Stops, lengths, seeded sampling and preemption with graphs: launched ahead or not, the
    same tokens (tests/unit/test_async_scheduling.py on the GPU)."""
    check_async_matches_sync(device="cuda")


@pytest.mark.gpu
def test_logprobs_and_penalties_keep_the_look_ahead_on_gpu():
    """Logprobs copied back with the tokens and penalties counting the pending token on the
    device, with graphs: the tokens and logprobs of one step at a time."""
    check_logprobs_and_penalties_keep_the_look_ahead(tolerance=1e-3, device="cuda")
