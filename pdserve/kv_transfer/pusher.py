"""A prefill node's side of the hand-over: during the step that completes some prompts, after
each layer has run, that layer's K and V of those prompts' blocks go to the KV sender.

One gather a layer for all of them: `index_select` of their pool rows (engine/kv_pool.py: every
layer's caches are views of one pool, a row per block of K or V) into slabs of consecutive
layers (`LayerSlabs`), then a `ticket.layer_shape` view for each prompt. The gather is a copy,
so the blocks may be freed and reused after the step; the sender holds the slabs until the
bytes have left. The rows are made once a step, with one copy to the device and no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pdserve.engine.host_copy import to_device
from pdserve.engine.kv_pool import LayerSlabs, kv_slots, pool_rows, slot_rows

from .connector import KVSender, KVTicket


class Completing(NamedTuple):
    """A prompt whose last chunk runs in this step: where its KV goes, and its blocks here."""

    ticket: KVTicket
    block_ids: list[int]  # the prompt's blocks on this node, in prompt order


class _Step(NamedTuple):
    tickets: list[KVTicket]
    num_rows: list[int]  # each prompt's rows in a layer's gather (2 a block: K's, then V's)
    rows: torch.Tensor  # [num_layers, all those rows] pool rows
    slabs: LayerSlabs


class KVPusher:
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], sender: KVSender):
        self.sender = sender
        self.kv_rows = pool_rows(kv_caches)  # [num_layers * 2 * num_blocks, block_numel]
        if self.kv_rows is None:
            raise ValueError("the KV pusher needs the caches as views of one pool (engine.kv_pool)")
        self.num_layers, self.num_blocks = len(kv_caches), kv_caches[0][0].shape[0]
        self._step: _Step | None = None

    def begin_step(self, completing: list[Completing]) -> None:
        """The prompts this step completes (their layers follow); none: nothing is pushed."""
        if not completing:
            self._step = _Step([], [], None, None)
            return
        slots = [s for c in completing for s in kv_slots(_sent_blocks(c), self.num_blocks)]
        rows = slot_rows(to_device(slots, torch.int64, self.kv_rows.device), self.num_layers, self.num_blocks)
        slabs = LayerSlabs(self.num_layers, (len(slots), self.kv_rows.shape[1]), self.kv_rows.dtype,
                           self.kv_rows.device)
        self._step = _Step([c.ticket for c in completing], [2 * len(c.ticket.block_ids) for c in completing],
                           rows, slabs)

    @property
    def in_step(self) -> bool:
        return self._step is not None

    def push_layer(self, layer: int) -> None:
        """Layer `layer` of this step has run: its KV of the completing prompts to the sender."""
        step = self._step
        if not step.tickets:
            return
        kv = torch.index_select(self.kv_rows, 0, step.rows[layer], out=step.slabs.layer(layer))
        self.sender.send_layers(layer, [(ticket, chunk.view(ticket.layer_shape))
                                        for ticket, chunk in zip(step.tickets, kv.split(step.num_rows))])

    def end_step(self) -> None:
        self._step = None  # made again by the next step's first layer


def _sent_blocks(c: Completing) -> list[int]:
    """This node's blocks of the prompt that the ticket asks for: those after the ones the
    decode node holds already."""
    start = c.ticket.num_cached_blocks
    return c.block_ids[start:start + len(c.ticket.block_ids)]
