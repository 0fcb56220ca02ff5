"""RouterService.Generate: validate -> pick a pair -> reserve on D -> prefill on P -> stream;
or, where the prompt is prefilled on the decode node (`disaggregation`: never, or auto with no
healthy prefill node): validate -> pick D -> stream from D.

Nothing is lost: an attempt that fails after some tokens were streamed is resumed on another
pair from the prompt plus the tokens already sent (the client sees no gap and no duplicate);
an attempt that fails before is simply retried. The client cancelling cancels both node
calls, which free their blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service import metrics
from pdserve.service.convert import FINISH_FROM_PROTO
from pdserve.service.server import abort
from pdserve.service.tracing import Tracing

from .api_keys import ApiKeys, metadata_key
from .detokenizer import IncrementalDetokenizer
from .nodes import NodeClient, PrefillWork
from .routing import Route, Routes
from .validation import checked_request
from .copies import copies
from .progress import Chunk, Progress
from .responses import chunk_response
from . import request_metrics
from .silence_watch import SilenceWatch, Watched

log = logging.getLogger(__name__)


class ClientError(Exception):
    """The request cannot be served: a node rejected it itself (bad input: no other node would
    take it), or every attempt failed. The handler answers with its code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class Retry(Exception):
    """An attempt failed in a way another pair may not: try again, avoiding `nodes`."""

    def __init__(self, reason: str, nodes: set, full: bool = False):
        super().__init__(reason)
        self.nodes, self.full = nodes, full


@dataclass
class Failures:
    """Why a completion's attempts failed; `full`: the last one found its decode node full."""

    reasons: list[str] = field(default_factory=list)
    full: bool = False


class RouterServicer(pb_grpc.RouterServiceServicer):
    tracing = Tracing("pdserve-router")  # off; the node sets its own (--otlp-endpoint)

    def __init__(self, routes: Routes, tokenizer, vocab_size: int, max_attempts: int = 3, model_name: str = "",
                 stream_timeout_s: float = 10.0, api_keys: ApiKeys = ApiKeys(), resume_wait_s: float = 60.0):
        self.routes, self.pool, self.tokenizer = routes, routes.pool, tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.max_attempts, self.resume_wait_s = max_attempts, resume_wait_s
        self.silence = SilenceWatch(stream_timeout_s)
        self.active_ids: set[str] = set()  # request ids of the streams open now
        self.api_keys = api_keys  # salts each key's prefix cache apart with --cache-isolation per-key

    async def Generate(self, request: pb.GenerateRequest, context):
        request_id = request.request_id or f"gen-{uuid.uuid4().hex[:16]}"
        if request_id in self.active_ids:  # refused before anything of the other request is touched
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is in use")
        self.active_ids.add(request_id)
        metrics.requests_in_flight.inc()
        span = self.tracing.start("router Generate", context.invocation_metadata(), request_id=request_id)
        try:
            progress = await self._parse(request, context)
            progress.trace = self.tracing.metadata(span)
            request.cache_salt = self.api_keys.cache_salt(request.cache_salt, metadata_key(context.invocation_metadata()))
            responses = (self._generate(request_id, request, progress) if request.n <= 1 else
                         copies(self._generate, request_id, request, progress))
            async for response in responses:
                yield response
        except ClientError as e:
            await abort(context, e.code, e.details)
        finally:
            self.active_ids.discard(request_id)
            metrics.requests_in_flight.dec()
            span.end()

    async def _generate(self, request_id: str, request: pb.GenerateRequest, progress: Progress):
        """One completion's responses, across attempts; ClientError when it cannot be served."""
        detok = IncrementalDetokenizer(self.tokenizer, progress.prompt + progress.sent) if self.tokenizer else None
        failures = Failures()
        ended = False  # finished, or failed: anything else that ends the stream is the client leaving
        try:
            async with contextlib.aclosing(self._attempts(request_id, request, progress, detok, failures)) as responses:
                async for response in responses:
                    if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        ended = True  # counted before the yield: the caller may close the stream on it
                        request_metrics.on_finished(progress, FINISH_FROM_PROTO[response.finish_reason],
                                                    time.monotonic())
                    yield response
                    if ended:
                        return  # closing the attempts cancels the decode call (a stop string: still running)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if failures.full else grpc.StatusCode.UNAVAILABLE
            detail = "; ".join(failures.reasons) or f"no healthy {self.routes.needed_nodes()}"
            raise ClientError(code, f"{request_id}: not served after {progress.num_attempts} attempt(s): {detail}")
        except ClientError:
            ended = True
            request_metrics.on_failed()
            raise
        finally:
            if not ended:
                request_metrics.on_cancelled(progress, time.monotonic())

    async def _attempts(self, request_id: str, request: pb.GenerateRequest, progress: Progress, detok,
                        failures: Failures):
        """The responses of attempt after attempt, up to the last; ends early when no attempt is
        left (`failures` says why each failed)."""
        excluded: set[NodeClient] = set()  # failed this request: avoided while others exist
        full_nodes: set[NodeClient] = set()  # decode nodes without room: never retried
        while progress.num_attempts < self.max_attempts or failures.full:
            look = functools.partial(self.routes.choose, progress.prompt + progress.sent, request.cache_salt, excluded,
                                     full_nodes)
            route = await look()
            if route is None and progress.num_attempts and not failures.full:
                route = await self._route_when_back(request_id, look, failures)
            if route is None:
                return
            progress.num_attempts += 1
            try:
                async with contextlib.aclosing(
                        self._attempt(request_id, request.cache_salt, progress, route)) as chunks:
                    async for chunk in chunks:
                        response = chunk_response(self.tokenizer, request_id, progress, detok, chunk)
                        yield response
                        if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                            return
            except Retry as e:
                failures.reasons.append(str(e))
                excluded |= e.nodes
                failures.full = e.full  # the last failure was a full decode node: try the others, uncounted
                if e.full:
                    full_nodes |= e.nodes
                metrics.retries_total.labels("full" if e.full else "failure").inc()
                log.warning("%s: attempt %d failed: %s", request_id, progress.num_attempts, e)

    async def _route_when_back(self, request_id: str, look, failures: Failures) -> Route | None:
        """A route for a request under way that found no healthy node: waits up to
        `resume_wait_s` for one to come back (a node restarting, the only decode node of a small
        deployment), looking as often as the pool's health is polled. None after that."""
        log.warning("%s: no healthy %s to resume on; waiting up to %.0f s for one", request_id,
                    self.routes.needed_nodes(), self.resume_wait_s)
        deadline = time.monotonic() + self.resume_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(min(self.pool.poll_interval_s, max(0.0, deadline - time.monotonic())))
            if (route := await look()) is not None:
                return route
        failures.reasons.append(f"no healthy {self.routes.needed_nodes()} came back within {self.resume_wait_s:g} s")
        return None

    async def _attempt(self, request_id: str, cache_salt: str, progress: Progress, route: Route):
        """Yields Chunks; raises Retry on node trouble."""
        if route.prefill is None:
            async for chunk in self._attempt_on_decode(request_id, cache_salt, progress, route):
                yield chunk
            return
        prefill, decode = route.prefill, route.decode
        prompt = progress.prompt + progress.sent
        attempt_id = f"{request_id}.{progress.num_attempts}"
        params = progress.remaining_params()
        decode.num_inflight += 1
        decode_call = decode.stub.Decode(pb.DecodeRequest(
            request_id=attempt_id, prompt_token_ids=prompt, sampling=params, cache_salt=cache_salt),
            metadata=decode.metadata + progress.trace)
        try:
            first = await _read(decode_call, decode)
            if not first.HasField("ticket"):
                raise Retry(f"decode node {decode.address} sent no ticket", {decode})
            response = await self._prefill(prefill, pb.PrefillRequest(
                request_id=attempt_id, prompt_token_ids=prompt, sampling=params,
                cache_salt=cache_salt, ticket=first.ticket), route.num_cached_tokens, progress.trace)
            progress.prefill = progress.prefill or response
            metrics.routed_cached_tokens.inc(response.num_cached_tokens)
            reason = FINISH_FROM_PROTO[response.finish_reason]
            first_logprobs = [response.first_token_logprob] if response.HasField("first_token_logprob") else []
            yield Chunk([response.first_token_id], reason, first_logprobs, response.prompt_logprobs)
            if reason is not None:
                return
            async for chunk in _chunks(decode_call, decode, self.silence):
                yield chunk
        finally:
            decode_call.cancel()  # a no-op once it finished; frees the blocks otherwise
            decode.num_inflight -= 1

    async def _attempt_on_decode(self, request_id: str, cache_salt: str, progress: Progress, route: Route):
        """An attempt on a decode node that prefills the prompt itself: its stream is the tokens.
        Until its first token the prompt counts as that node's prefill work (`PrefillWork`)."""
        decode, prompt = route.decode, progress.prompt + progress.sent
        attempt_id = f"{request_id}.{progress.num_attempts}"
        decode.num_inflight += 1
        work = PrefillWork(decode, len(prompt), route.num_cached_tokens)
        call = decode.stub.Decode(pb.DecodeRequest(
            request_id=attempt_id, prompt_token_ids=prompt,
            sampling=progress.remaining_params(), cache_salt=cache_salt, prefill_here=True),
            metadata=decode.metadata + progress.trace)
        try:
            async for chunk in _chunks(call, decode, self.silence, progress):
                work.done()
                yield chunk
        finally:
            work.done()
            call.cancel()  # a no-op once it finished; frees the blocks otherwise
            decode.num_inflight -= 1

    async def _prefill(self, node: NodeClient, message: pb.PrefillRequest, num_cached_tokens: int, trace: tuple):
        node.num_inflight += 1
        work = PrefillWork(node, len(message.prompt_token_ids), num_cached_tokens)
        try:
            return await node.stub.Prefill(message, metadata=node.metadata + trace)
        except grpc.aio.AioRpcError as e:
            raise _classify(e, node) from None
        finally:
            node.num_inflight -= 1
            work.done()

    # ---- validation -------------------------------------------------------------------

    async def _parse(self, request: pb.GenerateRequest, context) -> Progress:
        """The prompt's token ids and the sampling params; INVALID_ARGUMENT naming the field."""
        limits = self.pool.model_limits()
        if limits is None:
            await abort(context, grpc.StatusCode.UNAVAILABLE, f"no healthy {self.routes.needed_nodes()}")
        try:
            return await checked_request(request, self.tokenizer, self.vocab_size, limits[0])
        except ValueError as e:
            metrics.requests_total.labels("router", "invalid").inc()
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def GetInfo(self, request: pb.InfoRequest, context) -> pb.RouterInfo:
        limits = self.pool.model_limits()
        return pb.RouterInfo(model=self.model_name, max_model_len=limits[0] if limits else 0,
                             vocab_size=self.vocab_size,
                             num_prefill_nodes=len(self.pool.healthy("prefill")),
                             num_decode_nodes=len(self.pool.healthy("decode")),
                             has_tokenizer=self.tokenizer is not None, can_serve=self.routes.can_serve())


async def _chunks(call, decode: NodeClient, silence: SilenceWatch, progress: Progress | None = None):
    """The Chunks of a decode stream, up to the one with a finish reason; Retry when the stream
    ends before it, or stays silent past the watch's bound (a hung node: its heartbeats, empty
    chunks, stopped too). `progress` (a prompt prefilled on the decode node): takes the first
    chunk's count of prompt tokens its prefix cache held."""
    watched = silence.watch(call)
    try:
        while (message := await _read(call, decode, watched)) is not None:
            watched.last = time.monotonic()
            if not message.HasField("chunk"):
                raise Retry(f"decode node {decode.address} sent a ticket where token chunks were due", {decode})
            chunk = message.chunk
            if not chunk.token_ids and chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                continue  # a heartbeat
            if progress is not None and progress.first_at is None:
                progress.num_cached_tokens = chunk.num_cached_tokens
            reason = FINISH_FROM_PROTO[chunk.finish_reason]
            yield Chunk(list(chunk.token_ids), reason, chunk.logprobs, chunk.prompt_logprobs)
            if reason is not None:
                return
    finally:
        silence.unwatch(watched)
    raise Retry(f"decode node {decode.address} ended the stream early", {decode})


async def _read(call, node: NodeClient, watched: Watched | None = None):
    """The next message of a node's stream (None at its end); node failures, and a call the
    silence watch cancelled, become Retry."""
    try:
        message = await call.read()
    except grpc.aio.AioRpcError as e:
        raise _classify(e, node) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if watched is None or not watched.silent or (task is not None and getattr(task, "cancelling", lambda: 0)()):
            raise  # the handler itself is cancelled (the client left): not the node's fault
        node.mark_down(f"{node.role} node {node.address}: its stream was silent for {time.monotonic() - watched.last:.1f} s")
        raise Retry(f"{node.role} node {node.address} sent nothing for {time.monotonic() - watched.last:.1f} s",
                    {node}) from None
    return None if message is grpc.aio.EOF else message


def _classify(error: grpc.aio.AioRpcError, node: NodeClient) -> Exception:
    code = error.code()
    detail = f"{node.role} node {node.address}: {code.name}: {error.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ClientError(code, error.details())
    if code == grpc.StatusCode.UNAVAILABLE:
        node.mark_down(detail)
    return Retry(detail, {node}, full=code == grpc.StatusCode.RESOURCE_EXHAUSTED)


