"""A request's `n` completions (router/service.py): one prompt, `n` streams interleaved."""

from __future__ import annotations

import asyncio

from pdserve.protos import pdserve_pb2 as pb

from .progress import Progress


async def copies(generate, request_id: str, request: pb.GenerateRequest, progress: Progress):
    """`n` completions of one prompt, each streamed by `generate` (the router's `_generate`):
    the first alone until its first token (the prompt's KV is then in the prefix caches of the
    nodes it used, which the routing prefers), then the others, which reuse those blocks
    instead of computing and moving their own. Messages interleave, each with its completion's
    index; an error in one ends them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def run(copy: Progress) -> None:
        try:
            async for response in generate(f"{request_id}-{copy.index}" if copy.index else request_id,
                                           request, copy):
                await queue.put(response)
            await queue.put(None)
        except Exception as e:  # noqa: BLE001 - handed to the handler, which raises it
            await queue.put(e)

    tasks = [asyncio.create_task(run(progress))]
    try:
        num_done = 0
        while num_done < request.n:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if len(tasks) == 1:
                tasks += [asyncio.create_task(run(progress.copy_for(i))) for i in range(1, request.n)]
            if item is None:
                num_done += 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # closing each copy's stream cancels its node calls
        await asyncio.gather(*tasks, return_exceptions=True)
