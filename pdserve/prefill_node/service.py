"""PrefillService: schedule the prompt (batched, chunked, prefix-cached), push its KV into the
ticket's blocks layer by layer, sample the first token, answer once the KV is on the wire.

The KV leaves from the engine thread: after each layer of the step that completes a prompt,
`_push_layer` gathers that layer's K/V of the prompt's blocks (a copy, so the blocks may be
freed and reused after the step; into slabs of consecutive layers, engine/kv_pool.py
`LayerSlabs`) and queues it on the connector. Who frees the prefill node's blocks: the
scheduler, when the prompt's first token is sampled (they stay in the prefix cache), or
`abort_request` when the call fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid

import grpc
import torch

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.host_copy import to_device
from pdserve.engine.kv_pool import LayerSlabs, kv_slots, pool_rows, slot_rows
from pdserve.engine.request import RequestOutput
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.kv_transfer.connector import KVTicket
from pdserve.kv_transfer.senders import SenderByConnector
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service import metrics
from pdserve.service.convert import FINISH_TO_PROTO, sampling_from_proto, stats_to_proto, ticket_from_proto
from pdserve.service.server import Drainable, abort

log = logging.getLogger(__name__)


class PrefillServicer(Drainable, pb_grpc.PrefillServiceServicer):
    """Registered before the model loads (so health answers at once); `attach` makes it work."""

    def __init__(self, test_hold_s: float = 0.0):
        super().__init__()
        self.test_hold_s = test_hold_s  # test hook: each prompt waits this long, as if queued
        self.loop: EngineLoop | None = None
        self.tickets: dict[str, KVTicket] = {}  # request_id -> where its KV goes
        self.transfers: dict[str, concurrent.futures.Future] = {}  # request_id -> DONE sent

    def attach(self, loop: EngineLoop, sender: SenderByConnector) -> None:
        self.loop, self.engine, self.sender = loop, loop.engine, sender
        self.kv_rows = pool_rows(self.engine.runner.kv_caches)  # [num_layers * 2 * num_blocks, block_numel]
        self._pushing: tuple | None = None  # this step's prompts to push: _push_rows

    # ---- engine thread ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step(on_layer=self._push_layer)
        finally:
            self._pushing = None  # made again by the next step's first layer
        for out in outputs:
            ticket = self.tickets.pop(out.request_id, None)
            if ticket is not None and out.new_token_ids:
                self.transfers[out.request_id] = self.sender.finish(ticket, out.new_token_ids[0])
        return outputs

    def _push_layer(self, layer: int, scheduled: SchedulerOutput) -> None:
        """One gather for all the prompts this step finishes: their blocks' K and V of this
        layer, split into a `ticket.layer_shape` view for each."""
        if self._pushing is None:
            self._pushing = self._push_rows(scheduled)
        tickets, num_rows, rows, slabs = self._pushing
        if not tickets:
            return
        # [sum(num_rows), block_numel]
        kv = torch.index_select(self.kv_rows, 0, rows[layer], out=slabs.layer(layer))
        self.sender.send_layers(layer, [(ticket, chunk.view(ticket.layer_shape))
                                        for ticket, chunk in zip(tickets, kv.split(num_rows))])

    def _push_rows(self, scheduled: SchedulerOutput) -> tuple[list[KVTicket], list[int], torch.Tensor | None,
                                                              LayerSlabs | None]:
        """The tickets of the prompts whose last chunk runs in this step, the pool rows each
        one's layer takes (2 per block: its K's, then its V's), `[num_layers, all those rows]`
        (made once a step with one copy to the device, without a host sync), and the slabs the
        layers are gathered into."""
        num_blocks = self.engine.runner.num_blocks
        tickets, num_rows, slots = [], [], []
        for s in scheduled.scheduled:
            ticket = self.tickets.get(s.request.request_id)
            if ticket is None or not s.samples:  # not the prompt's last chunk
                continue
            tickets.append(ticket)
            num_rows.append(2 * len(ticket.block_ids))
            slots += kv_slots(self.engine.kv.block_ids(s.request.request_id)[:len(ticket.block_ids)], num_blocks)
        if not tickets:
            return tickets, num_rows, None, None
        num_layers = self.engine.model_config.num_layers
        rows = slot_rows(to_device(slots, torch.int64, self.kv_rows.device), num_layers, num_blocks)
        kv_rows = self.kv_rows
        slabs = LayerSlabs(num_layers, (len(slots), kv_rows.shape[1]), kv_rows.dtype, kv_rows.device)
        return tickets, num_rows, rows, slabs

    # ---- gRPC ---------------------------------------------------------------------------

    async def Prefill(self, request: pb.PrefillRequest, context):
        if self.draining or self.loop is None:
            await abort(context, grpc.StatusCode.UNAVAILABLE,
                        "prefill node is " + ("draining" if self.draining else "loading"))
        request_id = request.request_id or f"pre-{uuid.uuid4().hex[:12]}"
        prompt = list(request.prompt_token_ids)
        ticket = ticket_from_proto(request.ticket)
        problem = self._ticket_problem(ticket, len(prompt))
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"ticket: {problem}")
        queue = self.loop.open_stream(request_id)
        self.active.add(request_id)
        self.tickets[request_id] = ticket
        start, done = time.monotonic(), False
        try:
            try:
                params = sampling_from_proto(request.sampling)
                if self.test_hold_s:
                    await asyncio.sleep(self.test_hold_s)
                await self.loop.call(self.engine.add_request, prompt, params, request_id,
                                     request.cache_salt or None, prefill_only=True)
            except ValueError as e:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            output = await queue.get()
            if output is None:
                await abort(context, grpc.StatusCode.INTERNAL, f"{request_id}: engine step failed")
            prefill_s = time.monotonic() - start
            num_bytes = await self._transfer_done(request_id, ticket, context)
            done = True
            metrics.requests_total.labels("prefill", "ok").inc()
            metrics.prefix_cache_hits.inc(output.num_cached_tokens)
            metrics.kv_transfer_bytes.labels("sent").inc(num_bytes)
            return pb.PrefillResponse(first_token_id=output.new_token_ids[0],
                                      finish_reason=FINISH_TO_PROTO[output.finish_reason],
                                      num_cached_tokens=output.num_cached_tokens,
                                      prefill_seconds=prefill_s,
                                      kv_transfer_seconds=time.monotonic() - start - prefill_s,
                                      kv_bytes=num_bytes)
        finally:
            self.active.discard(request_id)
            self.loop.close_stream(request_id)
            self.tickets.pop(request_id, None)
            if not done:  # failed or cancelled: free the blocks, stop the transfer
                self.loop.call_soon(self.engine.abort_request, request_id)
                self.sender.abort(ticket)
                self.transfers.pop(request_id, None)

    async def _transfer_done(self, request_id: str, ticket: KVTicket, context) -> int:
        try:
            return await asyncio.wrap_future(self.transfers.pop(request_id))
        except (OSError, RuntimeError) as e:
            metrics.kv_transfer_failures.inc()
            await abort(context, grpc.StatusCode.UNAVAILABLE,
                        f"{request_id}: kv transfer to {ticket.kv_endpoint} failed: {e}")

    def _ticket_problem(self, ticket: KVTicket, num_prompt_tokens: int) -> str | None:
        cfg, engine = self.engine.model_config, self.engine
        mine = (engine.fingerprint, engine.config.block_size, cfg.num_layers, cfg.num_kv_heads,
                cfg.head_dim, str(engine.runner.dtype).removeprefix("torch."))
        theirs = (ticket.model_fingerprint, ticket.block_size, ticket.num_layers, ticket.num_kv_heads,
                  ticket.head_dim, ticket.dtype)
        if mine != theirs:
            return f"the decode node's KV layout {theirs} does not match this node's {mine}"
        if not self.sender.supports(ticket.connector):
            return f"connector {ticket.connector!r} is not supported here ({', '.join(self.sender.factories)})"
        if len(ticket.block_ids) != -(-num_prompt_tokens // ticket.block_size):
            return f"{len(ticket.block_ids)} blocks reserved for a prompt of {num_prompt_tokens} tokens"
        if ticket.deadline < time.time():
            return "the reservation has expired"
        return None

    async def GetStats(self, request, context):
        if self.loop is None:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "prefill node is loading")
        stats = self.loop.stats  # as of the last step or call: never waits for a step
        return stats_to_proto("prefill", self.engine.fingerprint, stats,
                              max_model_len=self.engine.max_model_len,
                              block_size=self.engine.config.block_size,
                              vocab_size=self.engine.model_config.vocab_size, draining=self.draining,
                              num_prefix_cache_hit_tokens=stats["num_cached_tokens"])
