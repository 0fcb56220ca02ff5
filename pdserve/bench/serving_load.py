"""The load of benchmarks/serving.py: workloads, arrival times, the streaming client, the same
load on an in-process Engine, and the summary of one phase."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Workload:
    prompts: list[list[int]]  # multi-turn: a chat's first prompt, then each turn's new message
    max_tokens: int
    # multi-turn: the request each one follows (sent once that one has finished), or None
    after: list[int | None] = field(default_factory=list)
    sent: dict[int, list[int]] = field(default_factory=dict)  # the prompts as sent

    def predecessor(self, i: int) -> int | None:
        return self.after[i] if self.after else None

    def prompt_for(self, i: int, results) -> list[int]:
        """Request i's prompt: a chat's next turn is the last turn's prompt, its answer (the
        token ids that came back: `results[j]`, a list or a dict) and the new message."""
        before = self.predecessor(i)
        prompt = self.prompts[i] if before is None else self.sent[before] + results[before].token_ids + self.prompts[i]
        self.sent[i] = prompt
        return prompt


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from the phase's start."""

    sent_at: float
    first_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # every streamed chunk
    end_at: float | None = None
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # the answer's
    error: str | None = None  # the HTTP status, or the exception's name

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_at is not None and self.end_at is not None


def make_workload(kind: str, vocab_size: int, count: int, input_len: tuple[int, int], output_len: int,
                  prefix_len: int, seed: int, num_turns: int = 4, turn_len: int = 64) -> Workload:
    """`random`: token ids uniform over the vocabulary (avoiding the first 100: special tokens),
    lengths uniform in `input_len`; `shared-prefix`: the same `prefix_len` tokens, then a
    random suffix of such a length; `multi-turn`: chats of `num_turns` turns, the first a
    prompt of such a length, each next one the last prompt, its answer and a new message of
    `turn_len` tokens, sent once the last turn has finished (`Workload.prompt_for`); `mix`: a
    third each of short prompts, long prompts and chat turns (`_mix`)."""
    rng = random.Random(seed)
    lo, hi = input_len
    if kind == "multi-turn":
        return _chats(rng, vocab_size, count, input_len, output_len, num_turns, turn_len)
    if kind == "mix":
        return _mix(rng, vocab_size, count, input_len, output_len, num_turns, turn_len)
    prefix = [rng.randrange(100, vocab_size) for _ in range(prefix_len)] if kind == "shared-prefix" else []
    prompts = [prefix + [rng.randrange(100, vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(count)]
    return Workload(prompts, output_len)


def _mix(rng, vocab_size, count, input_len, output_len, num_turns, turn_len) -> Workload:
    """A third each, interleaved: short prompts (a quarter of `input_len`), long ones (four
    times it) and chats of `num_turns` turns starting at `input_len`."""
    lo, hi = input_len
    tokens = lambda n: [rng.randrange(100, vocab_size) for _ in range(n)]  # noqa: E731
    num_chat = count // 3
    chats = _chats(rng, vocab_size, num_chat, input_len, output_len, num_turns, turn_len)
    singles = [tokens(rng.randint(max(1, lo // 4), max(1, hi // 4))) if i % 2 == 0 else tokens(rng.randint(4 * lo, 4 * hi))
               for i in range(count - num_chat)]
    prompts, after, where = [], [], {}
    order = sorted(range(count), key=lambda _: rng.random())  # positions of the chats' turns, kept in order
    chat_slots = sorted(order[:num_chat])
    single_iter, chat_i = iter(singles), 0
    for slot in range(count):
        if chat_i < num_chat and slot == chat_slots[chat_i]:
            before = chats.after[chat_i]
            prompts.append(chats.prompts[chat_i])
            after.append(None if before is None else where[before])
            where[chat_i] = slot
            chat_i += 1
        else:
            prompts.append(next(single_iter))
            after.append(None)
    return Workload(prompts, output_len, after)


def _chats(rng, vocab_size, count, input_len, output_len, num_turns, turn_len) -> Workload:
    tokens = lambda n: [rng.randrange(100, vocab_size) for _ in range(n)]  # noqa: E731
    prompts, after = [], []
    while len(prompts) < count:
        message, last = tokens(rng.randint(*input_len)), None
        for _ in range(min(num_turns, count - len(prompts))):
            prompts.append(message)
            after.append(last)
            last = len(prompts) - 1
            message = tokens(turn_len)
    return Workload(prompts, output_len, after)


def arrival_times(args, rate: float | None, count: int) -> list[float]:
    """Seconds from the phase's start: all 0 for a burst (rate None), else Poisson arrivals at
    `rate` (gamma with shape `args.burstiness`), from a fixed seed."""
    if rate is None:
        return [0.0] * count
    rng = np.random.default_rng(args.seed + int(rate * 1000))
    shape = args.burstiness if args.arrivals == "gamma" else 1.0
    gaps = rng.gamma(shape, 1.0 / (rate * shape), count)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


async def stream_requests(base_url: str, model: str, workload: Workload, arrivals: list[float],
                          max_seconds: float) -> tuple[list[RequestResult], float]:
    """Each request at its arrival time, streamed through the OpenAI API; (results, wall
    time from the first arrival to the last end). A chat's next turn goes once the last one
    has ended (and not before its own arrival time)."""
    import openai

    # the client's default pool (1000 connections) takes a burst of hundreds at once
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=max_seconds)
    start = time.perf_counter()
    finished = [asyncio.Event() for _ in workload.prompts]
    ended: dict[int, RequestResult] = {}  # what a chat's next turn reads its answer from

    async def one(i: int, at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        if workload.predecessor(i) is not None:  # a chat's next turn: once the last one ended
            await finished[workload.predecessor(i)].wait()
        result = RequestResult(sent_at=time.perf_counter() - start)
        try:
            return await _stream(client, model, workload, workload.prompt_for(i, ended), start, result)
        finally:
            ended[i] = result
            finished[i].set()

    tasks = [asyncio.create_task(one(i, at)) for i, at in enumerate(arrivals)]
    done, pending = await asyncio.wait(tasks, timeout=max_seconds + arrivals[-1])
    for task in pending:
        task.cancel()
    results = [t.result() if t in done else RequestResult(sent_at=0.0, error="timeout") for t in tasks]
    await client.close()
    return results, time.perf_counter() - start


async def _stream(client, model: str, workload: Workload, prompt: list[int], start: float,
                  result: RequestResult) -> RequestResult:
    """One request through the OpenAI API, its chunks' times into `result`."""
    import openai

    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=workload.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            now = time.perf_counter() - start
            if chunk.choices:
                result.first_at = result.first_at if result.first_at is not None else now
                result.chunk_times.append(now)
                result.token_ids += (chunk.choices[0].model_extra or {}).get("token_ids") or []
            if chunk.usage is not None:
                result.num_tokens = chunk.usage.completion_tokens
        result.end_at = time.perf_counter() - start
    except openai.APIStatusError as e:
        result.error = str(e.status_code)
    except (openai.APIError, asyncio.TimeoutError) as e:
        result.error = type(e).__name__
    return result


def run_engine(engine, workload: Workload, arrivals: list[float], max_seconds: float) -> tuple[list[RequestResult], float]:
    """The same arrivals on an in-process Engine: each request added at its arrival time (a
    chat's next turn once the last one has ended), stepped in this thread; a token's time is
    when the step that made it returned."""
    from pdserve.engine.sampling_params import SamplingParams

    engine.kv.pool.reset_prefix_cache()  # a phase starts cold, as the cluster's nodes do not
    params = SamplingParams(temperature=0, max_tokens=workload.max_tokens, ignore_eos=True)
    results = [RequestResult(sent_at=at) for at in arrivals]
    by_id, pending = {}, list(range(len(arrivals)))
    start = time.perf_counter()
    while (pending or engine.has_unfinished()) and time.perf_counter() - start < max_seconds + arrivals[-1]:
        now = time.perf_counter() - start
        for i in _ready(workload, arrivals, pending, results, now):
            pending.remove(i)
            results[i].sent_at = max(arrivals[i], now) if workload.predecessor(i) is not None else arrivals[i]
            by_id[engine.add_request(workload.prompt_for(i, results), params)] = results[i]
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(1e-3, min(arrivals[i] for i in pending) - now)))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            result = by_id[out.request_id]
            if out.new_token_ids:
                result.first_at = result.first_at if result.first_at is not None else now
                result.chunk_times.append(now)
                result.num_tokens += len(out.new_token_ids)
                result.token_ids += out.new_token_ids
            if out.finished:
                result.end_at = now
    for request_id, result in by_id.items():
        if result.end_at is None:
            engine.abort_request(request_id)
            result.error = "timeout"
    for i in pending:
        results[i].error = "timeout"
    return results, time.perf_counter() - start


def _ready(workload: Workload, arrivals: list[float], pending: list[int], results, now: float) -> list[int]:
    """The pending requests due now: arrived, and (a chat's next turn) after a finished one."""
    ready = []
    for i in pending:
        if arrivals[i] > now:
            break  # arrivals are in order
        before = workload.predecessor(i)
        if before is None or results[before].end_at is not None or results[before].error is not None:
            ready.append(i)
    return ready


def summarize(results: list[RequestResult], wall: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.first_at - r.sent_at for r in ok]
    tpot = [(r.end_at - r.first_at) / (r.num_tokens - 1) for r in ok if r.num_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2e = [r.end_at - r.sent_at for r in ok]
    good = [r for r in ok if r.first_at - r.sent_at <= slo_ttft
            and (r.num_tokens <= 1 or (r.end_at - r.first_at) / (r.num_tokens - 1) <= slo_tpot)]
    span = (max(r.end_at for r in ok) - min(r.sent_at for r in results)) if ok else wall
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "incomplete"] = errors.get(r.error or "incomplete", 0) + 1
    return {"num_requests": len(results), "num_ok": len(ok), "errors": errors,
            "ttft_ms": percentiles([1e3 * x for x in ttft]), "tpot_ms": percentiles([1e3 * x for x in tpot]),
            "itl_ms": percentiles([1e3 * x for x in itl]), "e2e_s": percentiles(e2e),
            "output_tok_s": sum(r.num_tokens for r in ok) / span if span > 0 else 0.0,
            "goodput_req_s": len(good) / span if span > 0 else 0.0, "duration_s": span}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}
    q = np.percentile(values, [50, 90, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "mean": statistics.fmean(values)}
