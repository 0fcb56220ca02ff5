"""CUDA graphs of decode steps: the whole forward of a batch of one-token sequences, captured
once per padded batch size at start-up and replayed, so a decode step costs a few launches
instead of hundreds of Python-issued kernels.

A graph reads its inputs from static device buffers and writes the final hidden states to a
static output; `run` copies the step's inputs in (from pinned host buffers; the input ids
from the device when the step before sampled them and is still in flight), pads the batch
to the next captured size and replays. Padding rows have slot -1 (store_kv skips them) and
a context of one token (block 0, whatever it holds: their outputs are dropped).

Decode attention takes `max_model_len` as its bound, so its grid (the number of KV splits)
is fixed per batch size and each sequence's split length is computed on the device.
"""

from __future__ import annotations

import logging
import time

import torch

from .attention import AttentionMetadata

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including `max_batch`."""
    sizes = {s for s in (1, 2, 4, 8, *range(16, max_batch + 1, 16)) if s <= max_batch}
    return sorted(sizes | {max_batch})


class DecodeGraphs:
    def __init__(self, model, kv_caches, backend, max_batch: int, max_model_len: int, block_size: int,
                 device: torch.device):
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_batch)
        max_blocks = -(-max_model_len // block_size)
        # static inputs: every graph reads them in place; host twins are pinned for async copies
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        # pinned host twins, two sets used in turn: a step is written into one while the
        # copies of the step before (launched, maybe not yet run) still read the other
        self._host = [self._host_twins(device) for _ in range(2)]
        self._host_np = [{name: t.numpy() for name, t in host.items()} for host in self._host]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # batch size -> its graph's hidden states
        self.num_captures = 0  # must not grow after start-up (checked by the GPU tests)

    def _inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "positions": self.positions, "slot_mapping": self.slot_mapping,
                "seq_lens": self.seq_lens, "block_tables": self.block_tables}

    def _host_twins(self, device: torch.device) -> dict[str, torch.Tensor]:
        pin = device.type == "cuda"  # twins start as copies: padding rows stay valid ids
        return {name: t.cpu().pin_memory() if pin else t.cpu().clone() for name, t in self._inputs().items()}

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured batch size holding `num_seqs`, None beyond the largest."""
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def forward(self, batch_size: int) -> torch.Tensor:
        """The decode forward over the first `batch_size` rows of the static inputs (what a
        graph captures): hidden states [batch_size, hidden_size]."""
        b = batch_size
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], cu_seqlens_q=self.cu_seqlens_q[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_model_len] * b,
            max_query_len=1, max_seq_len=self.max_model_len)
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, meta, self.backend)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every batch size, largest first, into one memory pool (a smaller graph
        reuses the larger ones' activation memory; only one graph runs at a time)."""
        start, before = time.perf_counter(), torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.batch_sizes):
            self.forward(b)  # eager first: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.forward(b)
            self.graphs[b] = graph
            self.num_captures += 1
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s, %.0f MiB",
                 len(self.graphs), self.batch_sizes[0], self.batch_sizes[-1], time.perf_counter() - start,
                 (torch.cuda.memory_reserved() - before) / 2**20)

    def run(self, batch, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replays the graph of the padded batch over a StepBatch of one-token sequences:
        hidden states [num_seqs, hidden_size] (valid until the next `run`). `input_ids` (on
        the device) replaces `batch.input_ids` when given."""
        n = len(batch.seq_lens)
        b = self.padded_size(n)
        host, arrays = self._host[self._turn], self._host_np[self._turn]
        self._turn ^= 1
        # this set's previous copies were queued two steps ago, before the step the host
        # has since waited for: they are done
        if input_ids is None:
            arrays["input_ids"][:n] = batch.input_ids
        arrays["positions"][:n] = batch.positions
        arrays["slot_mapping"][:n] = batch.slot_mapping
        arrays["slot_mapping"][n:b] = -1
        arrays["seq_lens"][:n] = batch.seq_lens
        arrays["seq_lens"][n:b] = 1
        for i, table in enumerate(batch.block_tables):
            arrays["block_tables"][i, :len(table)] = table  # entries past the context are never read
        for name, dev in self._inputs().items():
            if name == "input_ids" and input_ids is not None:
                dev[:n].copy_(input_ids)  # device to device, after the step that sampled them
            else:
                dev[:b].copy_(host[name][:b], non_blocking=True)
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self.forward(b)[:n]  # not captured (CPU): the same padded forward, eagerly
