"""A request id freed by an abort (`EngineLoop.call_soon(..., then=)`) can be reused without
the old request's output reaching the new stream: the output of a step that ended before the
abort ran is delivered first. The step is held on a gate, so the order is the test's, not a race."""

import asyncio
import threading

from pdserve.engine.engine import Engine
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def run_scenario(reopen_before_abort: bool) -> list:
    """Request "x" runs a step held on a gate; meanwhile its stream closes and its abort is
    queued; a stream reopened under "x" (before the abort ran, or once `then` fired) collects
    what reaches it."""
    engine = Engine(model="dummy:tiny", num_kv_blocks=64, max_model_len=512)
    entered, gate = threading.Event(), threading.Event()

    def step():
        entered.set()
        assert gate.wait(30)
        return engine.step()

    async def scenario():
        loop = EngineLoop(engine, step)
        loop.start()
        loop.open_stream("x")
        await loop.call(engine.add_request, [5, 6, 7, 8], PARAMS, "x")
        await asyncio.to_thread(entered.wait, 30)  # its step runs (and waits at the gate)
        loop.close_stream("x")
        freed = asyncio.Event()
        loop.call_soon(engine.abort_request, "x", then=freed.set)
        if reopen_before_abort:
            reopened = loop.open_stream("x")
        gate.set()
        await asyncio.wait_for(freed.wait(), 30)
        if not reopen_before_abort:
            reopened = loop.open_stream("x")
        await asyncio.sleep(0)  # anything delivered after `then` would be queued by now
        got = [reopened.get_nowait() for _ in range(reopened.qsize())]
        await loop.close()
        return got

    return asyncio.run(scenario())


def test_a_stream_reopened_before_the_abort_ran_gets_the_old_requests_output():
    """The hazard: why a node keeps an aborted request's id taken until `then`."""
    assert [o.request_id for o in run_scenario(reopen_before_abort=True)] == ["x"]


def test_a_stream_reopened_once_the_abort_ran_gets_nothing_of_the_old_request():
    assert run_scenario(reopen_before_abort=False) == []
