"""How many bytes the KV cache gets: a fixed size, or (CUDA, like vLLM) what is left of a
share of the GPU once the weights and the largest step's activations are counted.

The largest step is measured, not estimated: a profile forward of `max_num_batched_tokens`
prompt tokens in one sequence, plus the logits and sampling of `max_num_seqs` rows, with the
peak of this process's torch allocations recorded. The small cache that step writes to stays
counted: it stands for the copy of a step's KV that a prefill node gathers to send
(engine/kv_pool.py `LayerSlabs`), which is as large. Only this process's memory is counted, so
nodes sharing a GPU each take their own share (`pdserve up` splits it between them).
"""

from __future__ import annotations

import logging

import torch

from .step_batch import StepBatch

log = logging.getLogger(__name__)

CPU_DEFAULT_GB = 1.0
NON_TORCH_RESERVE = 2**30  # CUDA context, cuBLAS workspaces, Triton modules, decode graphs' pool
FREE_MARGIN = 2**29  # never take the last free bytes of a GPU other processes also use


def kv_cache_bytes(runner, config) -> int:
    """The KV cache's size in bytes for `runner` (its model already loaded)."""
    if config.kv_cache_memory_gb is not None:
        return int(config.kv_cache_memory_gb * 2**30)
    if runner.device.type != "cuda":
        return int(CPU_DEFAULT_GB * 2**30)
    return _from_gpu_share(runner, config)


def _from_gpu_share(runner, config) -> int:
    device = runner.device
    peak = _profile_peak(runner, config)
    free, total = torch.cuda.mem_get_info(device)
    allowed = int(config.gpu_memory_utilization * total)
    budget = allowed - peak - NON_TORCH_RESERVE
    gib = 2**30
    if budget < runner.block_bytes():
        raise ValueError(
            f"gpu_memory_utilization {config.gpu_memory_utilization} allows {allowed / gib:.1f} GiB of "
            f"{total / gib:.1f} GiB, but weights and activations take {peak / gib:.1f} GiB (plus "
            f"{NON_TORCH_RESERVE / gib:.0f} GiB reserved): no room for the KV cache; raise it, or lower "
            f"max_num_batched_tokens, or set kv_cache_memory_gb")
    if budget > free - FREE_MARGIN:
        log.warning("the KV cache would take %.1f GiB but the GPU has %.1f GiB free (another "
                    "process?): taking what is free", budget / gib, free / gib)
        budget = max(runner.block_bytes(), free - FREE_MARGIN)
    log.info("KV cache: %.1f GiB (gpu_memory_utilization %.2f of %.1f GiB; weights and peak "
             "activations %.1f GiB)", budget / gib, config.gpu_memory_utilization, total / gib, peak / gib)
    return budget


@torch.inference_mode()
def _profile_peak(runner, config) -> int:
    """Peak bytes this process's torch allocations reach in the largest step (weights included),
    with the small throw-away cache the profile step writes to (as large as the KV of a step
    that a prefill node gathers to send)."""
    device, block_size = runner.device, runner.block_size
    cfg = runner.model_config
    num_tokens = max(1, min(config.max_num_batched_tokens, runner.max_model_len - 1))
    num_blocks = -(-num_tokens // block_size)
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=runner.dtype, device=device),
               torch.zeros(shape, dtype=runner.dtype, device=device)) for _ in range(cfg.num_layers)]
    batch = StepBatch(block_tables=[list(range(num_blocks))], input_ids=[0] * num_tokens,
                      positions=list(range(num_tokens)), slot_mapping=list(range(num_tokens)),
                      query_lens=[num_tokens], seq_lens=[num_tokens])
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    hidden = runner.model(torch.zeros(num_tokens, dtype=torch.int64, device=device),
                          torch.arange(num_tokens, device=device), caches, runner.metadata(batch),
                          runner.backend)
    rows = hidden[:min(config.max_num_seqs, num_tokens)]
    logits = runner.model.compute_logits(rows).float()
    logits.softmax(dim=-1).sort(dim=-1)  # what top-p sampling allocates
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del caches, hidden, rows, logits
    torch.cuda.empty_cache()
    return peak
