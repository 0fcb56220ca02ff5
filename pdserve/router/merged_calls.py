"""Several Generate streams read as one (torch-free): the completions API's list of prompts.

Prompt i's responses get index i * n + their own index (OpenAI numbers the choices of a list
of prompts so), interleaved as they come. An error on any stream is raised by `read`; `cancel`
cancels them all (each cancelled call frees its request's blocks).
"""

from __future__ import annotations

import asyncio

import grpc

from .router_calls import ReadAsIterator


class MergedCall(ReadAsIterator):
    def __init__(self, calls: list, n: int):
        self.calls, self.n = calls, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.num_open = len(calls)
        self.tasks = [asyncio.ensure_future(self._pump(i, call)) for i, call in enumerate(calls)]

    async def _pump(self, i: int, call) -> None:
        try:
            async for response in call:
                response.index += i * self.n
                await self.queue.put(response)
            await self.queue.put(None)
        except grpc.aio.AioRpcError as e:
            await self.queue.put(e)

    async def read(self):
        """The next response of any stream, or grpc.aio.EOF once all have ended."""
        while self.num_open:
            item = await self.queue.get()
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            if item is not None:
                return item
            self.num_open -= 1
        return grpc.aio.EOF

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        for task in self.tasks:
            task.cancel()
