"""The gateway's routers (`--router a:50051,b:50051`), and a Generate stream that outlives the
router serving it (torch-free).

A stream whose router goes away (the connection breaks, or the router answers UNAVAILABLE)
goes on at the next router: the same request, with the tokens the client has received and the
number of characters of their text (router/resume.py), so the client sees no gap and no
duplicate. Each router is tried once per request, starting from a different one each time
(round robin); with a single address (a Kubernetes Service in front of several routers) that
address is tried twice. A request of several completions (n > 1) resumes only before its
first token.
A status that a router answered itself for the request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
...) is the client's answer, and so is a deadline.
"""

from __future__ import annotations

import itertools
import logging
import time

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service.call_guard import answered
from pdserve.service.tls import Tls

log = logging.getLogger(__name__)

BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}  # when not answered


def parse_routers(text: str) -> list[str]:
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    if not addresses:
        raise ValueError("--router: give at least one host:port")
    return addresses


class Routers:
    def __init__(self, addresses: list[str], tls: Tls = Tls()):
        self.addresses = addresses
        self.channels = [tls.channel(a) for a in addresses]
        self.stubs = [pb_grpc.RouterServiceStub(c) for c in self.channels]
        self._turn = itertools.count()

    def order(self) -> list[int]:
        """Every router once, starting at the next in turn (a lone address twice)."""
        if len(self.stubs) == 1:
            return [0, 0]
        start = next(self._turn) % len(self.stubs)
        return [(start + i) % len(self.stubs) for i in range(len(self.stubs))]

    async def info(self, timeout: float) -> pb.RouterInfo:
        """The first router's answer that comes; the last error when none answers."""
        error = None
        for i in self.order():
            try:
                return await self.stubs[i].GetInfo(pb.InfoRequest(), timeout=timeout)
            except grpc.aio.AioRpcError as e:
                error = e
        raise error

    def generate(self, request: pb.GenerateRequest, timeout: float, metadata: tuple) -> "ResumableCall":
        return ResumableCall(self, request, timeout, metadata)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class ReadAsIterator:
    """`async for` over a call-like object's `read()` (grpc.aio.EOF ends it)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        response = await self.read()
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return response


class ResumableCall(ReadAsIterator):
    """A Generate stream, read as a grpc.aio call is (`read`, `async for`, `cancel`)."""

    def __init__(self, routers: Routers, request: pb.GenerateRequest, timeout: float, metadata: tuple):
        self.routers, self.request, self.metadata = routers, request, metadata
        self.deadline = time.monotonic() + timeout
        self.untried = routers.order()
        self.token_ids: list[int] = []  # what the client has received, to resume after
        self.num_chars = 0
        self.num_responses = 0
        self.num_starts = 0
        self.cancelled = False
        self.call = self._start()

    def _start(self):
        router = self.untried.pop(0)
        request = self.request
        if self.num_starts:  # a new id: the nodes refuse the old one's until they let go of its requests
            request = pb.GenerateRequest()
            request.CopyFrom(self.request)
            request.request_id = f"{self.request.request_id}-r{self.num_starts}"
            request.resume_token_ids[:] = self.token_ids
            request.resume_text_chars = self.num_chars
        self.num_starts += 1
        return self.routers.stubs[router].Generate(request, timeout=max(0.0, self.deadline - time.monotonic()),
                                                   metadata=self.metadata)

    async def read(self):
        """The next response, or grpc.aio.EOF; raises AioRpcError when the stream cannot go on."""
        while True:
            try:
                response = await self.call.read()
            except grpc.aio.AioRpcError as e:
                if not self._resumable(e):
                    raise
                log.warning("%s: router gone (%s: %s); resuming after %d tokens on the next router",
                            self.request.request_id, e.code().name, e.details(), len(self.token_ids))
                self.call = self._start()
                continue
            if response is not grpc.aio.EOF:
                self.num_responses += 1
                self.token_ids += response.token_ids
                self.num_chars += len(response.text)
            return response

    def _resumable(self, error: grpc.aio.AioRpcError) -> bool:
        if self.cancelled or not self.untried or time.monotonic() >= self.deadline:
            return False
        if self.request.n > 1 and self.num_responses:
            return False
        code = error.code()
        return code == grpc.StatusCode.UNAVAILABLE or (code in BROKEN and not answered(error))

    def cancel(self) -> None:
        self.cancelled = True
        self.call.cancel()
