"""DecodeService: (queue) -> reserve -> ticket -> receive KV -> admit -> stream tokens -> free;
or, with `prefill_here` (aggregated serving): the prompt joins this node's engine as any
request does (chunked prefill in the continuous batch, its own prefix cache) -> stream tokens.

A request whose prompt does not fit in the free blocks waits in the admission queue
(admission.py) until it does; only a full queue answers RESOURCE_EXHAUSTED. The ticket's
deadline is for the KV's first bytes (the prefill may queue until then); once they come, the
receiver gives the transfer `kv_transfer_timeout_s` to land. The request joins the running
batch only after its KV is in the blocks (the receiver settles it once its copies have run).

Who frees a reservation's blocks: this handler, always, in its `finally` (engine abort is a
no-op once the request finished): when the transfer fails, when a deadline passes, when the
router cancels the call, or when the node drains; for a transfer that a sender on this host
writes in place (the ipc connector), only once that sender is done with the blocks (the
receiver's `forget(..., then)`, kv_transfer/claims.py). Every exit kicks the admission queue.
A request prefilled here waits in the engine's own queue for blocks; both queues together
are bounded by `max_queued_requests`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import grpc

from pdserve.engine.engine_loop import EngineLoop
from pdserve.kv_transfer.connector import KVReceiver, KVTicket, TransferResult
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service import metrics
from pdserve.service.cluster_auth import ClusterAuth
from pdserve.service.tracing import Tracing
from pdserve.service.convert import (FINISH_TO_PROTO, logprobs_to_proto, sampling_from_proto, stats_to_proto,
                                     ticket_to_proto)
from pdserve.service.server import Drainable, abort

from .admission import AdmissionQueue, QueueFull

log = logging.getLogger(__name__)


class DecodeServicer(Drainable, pb_grpc.DecodeServiceServicer):
    """Registered before the model loads (so health answers at once); `attach` makes it work."""

    tracing = Tracing("pdserve-decode")  # off; the node sets its own (--otlp-endpoint)

    def __init__(self, reservation_timeout_s: float, kv_connector: str = "tcp", max_queued_requests: int = 256,
                 auth: ClusterAuth = ClusterAuth()):
        super().__init__()
        self.auth = auth  # signs the tickets: prefill nodes send only where a member asked
        self.reservation_timeout_s = reservation_timeout_s
        self.kv_connector = kv_connector
        self.admission = AdmissionQueue(max_queued_requests)
        self.loop: EngineLoop | None = None
        self.num_transfer_failures = 0
        self._beats: asyncio.Task | None = None

    def attach(self, loop: EngineLoop, receiver: KVReceiver) -> None:
        self.loop, self.engine, self.receiver = loop, loop.engine, receiver

    def _start_beats(self) -> None:
        """Once: a task that marks every open stream each HEARTBEAT_S (one put per stream, not
        a timer per chunk read)."""
        if self._beats is None:
            self._beats = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.loop.beat(BEAT)

    async def Decode(self, request: pb.DecodeRequest, context):
        if self.draining or self.loop is None:
            await abort(context, grpc.StatusCode.UNAVAILABLE,
                        "decode node is " + ("draining" if self.draining else "loading"))
        request_id = request.request_id or f"dec-{uuid.uuid4().hex[:12]}"
        if request_id in self.active:  # refused before the other request's stream or ticket is touched
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is in use")
        queue = self.loop.open_stream(request_id)
        ticket, finished = None, False
        self.active.add(request_id)
        span = self.tracing.start("decode Decode", context.invocation_metadata(), request_id=request_id,
                                  prefill_here=request.prefill_here)
        try:
            if request.prefill_here:
                await self._add_here(request, request_id, context)
            else:
                ticket = await self._reserve(request, request_id, context)
                transfer = asyncio.get_running_loop().create_future()
                self.receiver.expect(ticket, _settle_from_thread(transfer))
                yield pb.DecodeResponse(ticket=ticket_to_proto(ticket))
                while not transfer.done():  # the KV lands: the router hears we are alive
                    try:
                        await asyncio.wait_for(asyncio.shield(transfer), HEARTBEAT_S)
                    except TimeoutError:
                        yield _chunk([], None)
                first_token_id = await self._await_transfer(transfer, ticket, request_id, context)
                try:
                    admitted = await self.loop.call(self.engine.admit, request_id, first_token_id)
                except ValueError as e:  # the transfer's DONE named no token: this request fails alone
                    self._count_failure()
                    await abort(context, grpc.StatusCode.DATA_LOSS, f"{request_id}: kv transfer: {e}")
                if admitted is None:
                    await abort(context, grpc.StatusCode.ABORTED, f"{request_id}: reservation lost")
                if admitted.finished:  # the first token already ended it (EOS, max_tokens 1)
                    finished = True
                    metrics.requests_total.labels("decode", "ok").inc()
                    metrics.observe_request_times(admitted.times)
                    yield _chunk([], admitted.finish_reason)
                    return
            self._start_beats()
            beats_since_sent = 0
            while not finished:
                outputs = [await queue.get()]
                while not queue.empty():
                    outputs.append(queue.get_nowait())
                outputs = [o for o in outputs if o is not BEAT]
                if not outputs:  # only beats: waiting (queued, preempted, a long step)
                    beats_since_sent += 1
                    if beats_since_sent >= 2:  # a whole beat period without output: say we are alive
                        beats_since_sent = 0
                        yield _chunk([], None)
                    continue
                beats_since_sent = 0
                if None in outputs:
                    await abort(context, grpc.StatusCode.INTERNAL, f"{request_id}: engine step failed")
                finished = outputs[-1].finished
                if finished:  # counted before the last yield: the caller may close the stream on it
                    metrics.requests_total.labels("decode", "ok").inc()
                    metrics.observe_request_times(outputs[-1].times)
                yield _chunk([t for o in outputs for t in o.new_token_ids], outputs[-1].finish_reason,
                             outputs[0].num_cached_tokens, [lp for o in outputs for lp in o.logprobs or ()],
                             outputs[0].prompt_logprobs or ())
        finally:
            span.end()
            self.loop.close_stream(request_id)
            if finished:
                self.active.discard(request_id)
            else:  # cancelled, failed or expired: give the blocks back; the id is free once aborted
                metrics.count_unfinished("decode")
                def free() -> None:
                    self.loop.call_soon(self.engine.abort_request, request_id,
                                        then=lambda: self.active.discard(request_id))
                    self.admission.kick()  # after the abort: the engine thread runs calls in order

                if ticket is None:
                    free()
                else:  # once no sender may write its blocks any more (the ipc connector's may)
                    self.receiver.forget(ticket.transfer_id, then=_on_loop(free))
            self.admission.kick()

    async def _add_here(self, request: pb.DecodeRequest, request_id: str, context) -> None:
        """The prompt joins the engine's queue, to be prefilled in this node's batch."""
        if self.loop.stats["num_waiting"] + self.admission.num_waiting >= self.admission.max_waiting:
            metrics.admission_refused.inc()
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"decode node is full: {self.admission.max_waiting} requests wait already")
        try:
            params = sampling_from_proto(request.sampling)
            self._check_fits(len(request.prompt_token_ids))
            await self.loop.call(self.engine.add_request, list(request.prompt_token_ids), params, request_id,
                                 request.cache_salt or None)
        except ValueError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _check_fits(self, num_prompt_tokens: int) -> None:
        need = -(-num_prompt_tokens // self.engine.config.block_size)
        if need > self.engine.kv.pool.num_blocks:
            raise ValueError(f"prompt_token_ids: the prompt needs {need} KV blocks, this decode node "
                             f"has {self.engine.kv.pool.num_blocks} in all")

    async def _reserve(self, request: pb.DecodeRequest, request_id: str, context) -> KVTicket:
        """Blocks for the prompt, now or after a wait in the admission queue; the ticket asks
        only for those the prefix cache does not hold."""
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
            self._check_fits(len(prompt))
            reservation = await self.admission.reserve(lambda: self.loop.call(
                self.engine.reserve, prompt, params, request_id, request.cache_salt or None))
        except ValueError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            metrics.admission_refused.inc()
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode node is full: {e}")
        cfg, runner = self.engine.model_config, self.engine.runner
        num_cached = reservation.num_cached_blocks
        return self.auth.sign(KVTicket(  # with a fresh secret (the ticket's own) for the sender to prove
            uuid.uuid4().hex, self.receiver.endpoint, tuple(reservation.block_ids[num_cached:]),
            self.engine.config.block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
            str(runner.dtype).removeprefix("torch."), time.time() + self.reservation_timeout_s,
            self.engine.fingerprint, self.kv_connector, num_cached, ipc=self.receiver.ipc_descriptor))

    async def _await_transfer(self, transfer: asyncio.Future, ticket: KVTicket, request_id: str,
                              context) -> int:
        result: TransferResult = await transfer  # the receiver settles it, at its deadlines too
        if not result.ok:
            self._count_failure()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if result.timed_out else grpc.StatusCode.DATA_LOSS
            await abort(context, code, f"{request_id}: kv transfer failed: {result.error}")
        metrics.kv_transfer_bytes.labels("received").inc(result.num_bytes)
        if result.in_place:
            metrics.kv_transfers_in_place.inc()
        return result.first_token_id

    def _count_failure(self) -> None:
        self.num_transfer_failures += 1
        metrics.kv_transfer_failures.inc()

    async def GetStats(self, request, context):
        if self.loop is None:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "decode node is loading")
        stats = self.loop.stats  # as of the last step or call: never waits for a step
        return stats_to_proto("decode", self.engine.fingerprint, stats,
                              max_model_len=self.engine.max_model_len,
                              block_size=self.engine.config.block_size,
                              vocab_size=self.engine.model_config.vocab_size, draining=self.draining,
                              num_kv_transfer_failures=self.num_transfer_failures,
                              num_waiting=stats["num_waiting"] + self.admission.num_waiting)


# a stream that produced nothing for a beat period sends an empty chunk: the router bounds the
# silence of a stream (a hung node) at a few of these
HEARTBEAT_S = 0.5
BEAT = object()  # the marker EngineLoop.beat puts into every open stream


def _chunk(token_ids, finish_reason, num_cached_tokens: int = 0, logprobs=(), prompt_logprobs=()) -> pb.DecodeResponse:
    return pb.DecodeResponse(chunk=pb.TokenChunk(token_ids=token_ids, finish_reason=FINISH_TO_PROTO[finish_reason],
                                                 num_cached_tokens=num_cached_tokens,
                                                 logprobs=[logprobs_to_proto(lp) for lp in logprobs],
                                                 prompt_logprobs=[logprobs_to_proto(lp) for lp in prompt_logprobs]))


def _on_loop(fn):
    """`fn` as a callback from any thread: run at once when called on this event loop's
    thread (so in order with what the caller does next), else handed to the loop."""
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()

    def run() -> None:
        if threading.get_ident() == loop_thread:
            fn()
        else:
            loop.call_soon_threadsafe(fn)
    return run


def _settle_from_thread(future: asyncio.Future):
    """A receiver callback (called on a receiver thread) that resolves `future` on its loop."""
    loop = future.get_loop()

    def on_done(result: TransferResult) -> None:
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))

    return on_done
