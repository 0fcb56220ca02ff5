"""What every pdserve gRPC call passes before its handler runs, and what it turns into a status
after: a server interceptor on each component's server (service/server.py).

- Who may call: `authenticate(method, metadata)` says why a call is refused (UNAUTHENTICATED),
  or None. Health checks and reflection are never guarded (Kubernetes probes them).
- Bytes that are not a valid request message get INVALID_ARGUMENT, not grpc's generic error.
- An exception a handler did not expect is logged and answered INTERNAL with its message:
  a client never sees UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

GUARDED_PREFIX = "/pdserve."  # our services; grpc.health and reflection pass untouched
# trailing metadata on every status a pdserve service answers itself (server.py `abort` too): a
# caller tells it from a status its gRPC library made up because the connection broke (the
# gateway resumes a stream on another router then)
ANSWERED = (("pdserve-answered", "1"),)


def answered(error: grpc.RpcError) -> bool:
    """Whether a pdserve service itself ended the call with this status."""
    return any(key == ANSWERED[0][0] for key, _ in error.trailing_metadata() or ())

Authenticate = Callable[[str, tuple], "str | None"]


@dataclass(frozen=True)
class Malformed:
    """What a request that did not parse becomes (its handler never sees it)."""

    error: str


class CallGuard(grpc.aio.ServerInterceptor):
    """Wraps each of our methods' handlers once, on its first call; each call then only runs
    `authenticate` on its metadata."""

    def __init__(self, authenticate: Authenticate = lambda method, metadata: None):
        self.authenticate = authenticate
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        guarded = self._guarded.get(details.method)
        if guarded is not None:
            return guarded
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED_PREFIX):
            return handler
        guarded = self._guarded[details.method] = _guarded(handler, details.method, self.authenticate)
        return guarded


def _guarded(handler, method: str, authenticate: Authenticate):
    deserialize = handler.request_deserializer

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001  (protobuf's DecodeError, or whatever a parser raises)
            return Malformed(f"{type(e).__name__}: {e}"[:200])

    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary(request, context):
            await _admit(request, context, authenticate(method, context.invocation_metadata() or ()))
            try:
                return await inner(request, context)
            except Exception as e:  # noqa: BLE001
                await _internal(e, context)

        return grpc.unary_unary_rpc_method_handler(unary, parse, handler.response_serializer)
    if handler.unary_stream:
        inner = handler.unary_stream

        async def stream(request, context):
            await _admit(request, context, authenticate(method, context.invocation_metadata() or ()))
            try:
                async for response in inner(request, context):
                    yield response
            except Exception as e:  # noqa: BLE001
                await _internal(e, context)

        return grpc.unary_stream_rpc_method_handler(stream, parse, handler.response_serializer)
    return handler  # no client-streaming methods in pdserve


async def _admit(request, context, refusal: str | None) -> None:
    if refusal is not None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal, trailing_metadata=ANSWERED)
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.error}",
                            trailing_metadata=ANSWERED)


async def _internal(error: Exception, context) -> None:
    if isinstance(error, (grpc.aio.AbortError, asyncio.CancelledError)):
        raise error
    log.exception("unexpected error in a handler")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"[:300],
                        trailing_metadata=ANSWERED)
