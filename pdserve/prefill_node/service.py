"""PrefillService: schedule the prompt (batched, chunked, prefix-cached), push its KV into the
ticket's blocks layer by layer, sample the first token and answer with it at once: the KV
that is still moving lands on the decode node, which admits the request only then.

The KV leaves from the engine thread: after each layer of the step that completes a prompt,
the KV pusher (kv_transfer/pusher.py) gathers that layer's K/V of the prompt's blocks (a
copy, so the blocks may be freed and reused after the step) and queues it on the connector.
Who frees the prefill node's blocks: the scheduler, when the prompt's first token is sampled
(they stay in the prefix cache), or `abort_request` when the call fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid

import grpc

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.request import RequestOutput
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.kv_transfer.connector import KVTicket
from pdserve.kv_transfer.pusher import Completing, KVPusher
from pdserve.kv_transfer.senders import SenderByConnector
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service import metrics
from pdserve.service.cluster_auth import ClusterAuth
from pdserve.service.tracing import Tracing
from pdserve.service.convert import (FINISH_TO_PROTO, logprobs_to_proto, sampling_from_proto, stats_to_proto,
                                     ticket_from_proto)
from pdserve.service.server import Drainable, abort

log = logging.getLogger(__name__)


class PrefillServicer(Drainable, pb_grpc.PrefillServiceServicer):
    """Registered before the model loads (so health answers at once); `attach` makes it work."""

    tracing = Tracing("pdserve-prefill")  # off; the node sets its own (--otlp-endpoint)

    def __init__(self, test_hold_s: float = 0.0, auth: ClusterAuth = ClusterAuth()):
        super().__init__()
        self.auth = auth  # a ticket must be signed by a decode node of the cluster
        self.test_hold_s = test_hold_s  # test hook: each prompt waits this long, as if queued
        self.loop: EngineLoop | None = None
        self.tickets: dict[str, KVTicket] = {}  # request_id -> where its KV goes
        self.transfers: dict[str, concurrent.futures.Future] = {}  # request_id -> DONE sent

    def attach(self, loop: EngineLoop, sender: SenderByConnector) -> None:
        self.loop, self.engine, self.sender = loop, loop.engine, sender
        self.pusher = KVPusher(self.engine.runner.kv_caches, sender)

    # ---- engine thread ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step(on_layer=self._on_layer)
        finally:
            self.pusher.end_step()
        for out in outputs:
            ticket = self.tickets.pop(out.request_id, None)
            if ticket is not None and out.new_token_ids:
                self.transfers[out.request_id] = self.sender.finish(ticket, out.new_token_ids[0])
        return outputs

    def _on_layer(self, layer: int, scheduled: SchedulerOutput) -> None:
        if not self.pusher.in_step:
            self.pusher.begin_step(self._completing(scheduled))
        self.pusher.push_layer(layer)

    def _completing(self, scheduled: SchedulerOutput) -> list[Completing]:
        """The prompts whose last chunk runs in this step, with their tickets."""
        completing = []
        for s in scheduled.scheduled:
            ticket = self.tickets.get(s.request.request_id)
            if ticket is not None and s.samples:
                completing.append(Completing(ticket, self.engine.kv.block_ids(s.request.request_id)))
        return completing

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
        if request_id in self.active:  # refused before the other request's stream or ticket is touched
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is in use")
        queue = self.loop.open_stream(request_id)
        self.active.add(request_id)
        self.tickets[request_id] = ticket
        start, done = time.monotonic(), False
        span = self.tracing.start("prefill Prefill", context.invocation_metadata(), request_id=request_id,
                                  prompt_tokens=len(prompt))
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
            self._follow_transfer(request_id, ticket, span)
            done = True
            metrics.requests_total.labels("prefill", "ok").inc()
            metrics.observe_request_times(output.times)
            return pb.PrefillResponse(first_token_id=output.new_token_ids[0],
                                      first_token_logprob=logprobs_to_proto(output.logprobs[0])
                                      if output.logprobs else None,
                                      prompt_logprobs=[logprobs_to_proto(lp) for lp in output.prompt_logprobs or ()],
                                      finish_reason=FINISH_TO_PROTO[output.finish_reason],
                                      num_cached_tokens=output.num_cached_tokens,
                                      prefill_seconds=prefill_s,
                                      kv_transfer_seconds=time.monotonic() - start - prefill_s,
                                      kv_bytes=ticket.num_layers * ticket.layer_bytes)
        finally:
            span.end()
            self.loop.close_stream(request_id)
            self.tickets.pop(request_id, None)
            if done:
                self.active.discard(request_id)
            else:  # failed or cancelled: free the blocks, stop the transfer; the id is free once aborted
                metrics.count_unfinished("prefill")
                self.loop.call_soon(self.engine.abort_request, request_id,
                                    then=lambda: self.active.discard(request_id))
                self.sender.abort(ticket)
                self.transfers.pop(request_id, None)

    def _follow_transfer(self, request_id: str, ticket: KVTicket, parent_span) -> None:
        """The first token goes back at once, while the KV may still be moving: the decode node
        admits the request only once it has landed, and fails its stream if it never does (the
        router then resumes elsewhere). Here the transfer is only counted, traced (its tail,
        from the first token to the DONE sent), logged if it fails, and waited for by a drain."""
        transfer = self.transfers.pop(request_id, None)
        if transfer is None:  # the DONE was not queued (the sender failed it at once)
            return
        key, started = f"{request_id}/kv", time.monotonic()
        self.active.add(key)
        span = self.tracing.start("kv transfer", parent=parent_span, endpoint=ticket.kv_endpoint,
                                  connector=ticket.connector)

        def sent(future: asyncio.Future) -> None:
            self.active.discard(key)
            error = future.exception()
            span.set_attribute("ok", error is None)
            span.end()
            if error is None:
                metrics.kv_transfer_bytes.labels("sent").inc(future.result())
                metrics.kv_transfer_seconds.observe(time.monotonic() - started)
                return
            metrics.kv_transfer_failures.inc()
            log.warning("%s: kv transfer to %s failed: %s", request_id, ticket.kv_endpoint, error)

        asyncio.wrap_future(transfer).add_done_callback(sent)

    def _ticket_problem(self, ticket: KVTicket, num_prompt_tokens: int) -> str | None:
        if not self.auth.issued_by_member(ticket):  # else anyone could name an endpoint to send to
            return "not signed by a decode node of this cluster"
        if not ticket.secret:
            return "no secret to prove on the KV channel"
        cfg, engine = self.engine.model_config, self.engine
        mine = (engine.fingerprint, engine.config.block_size, cfg.num_layers, cfg.num_kv_heads,
                cfg.head_dim, str(engine.runner.dtype).removeprefix("torch."))
        theirs = (ticket.model_fingerprint, ticket.block_size, ticket.num_layers, ticket.num_kv_heads,
                  ticket.head_dim, ticket.dtype)
        if mine != theirs:
            return f"the decode node's KV layout {theirs} does not match this node's {mine}"
        if not self.sender.supports(ticket.connector):
            return f"connector {ticket.connector!r} is not supported here ({', '.join(self.sender.factories)})"
        if ticket.num_cached_blocks + len(ticket.block_ids) != -(-num_prompt_tokens // ticket.block_size):
            return (f"{ticket.num_cached_blocks} cached and {len(ticket.block_ids)} reserved blocks for a "
                    f"prompt of {num_prompt_tokens} tokens")
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
