"""What the router records of each completion it serves (the router's families in
service/metrics.py): time to first token and between tokens as they stream; once it ends, its
outcome and, for one that finished, its finish reason, latency and token counts. A completion
the client left before its end is `cancelled`, counted under finish reason `abort` (vLLM's)."""

from __future__ import annotations

from pdserve.engine.request import FinishReason
from pdserve.service import metrics

from .progress import Progress


def on_tokens(progress: Progress, num_tokens: int, now: float) -> None:
    """A chunk of `num_tokens` is about to stream (the first chunk: the first token)."""
    if progress.first_at is None:
        metrics.time_to_first_token.observe(now - progress.start)
    elif num_tokens:
        gap = (now - progress.last_at) / num_tokens
        for _ in range(num_tokens):
            metrics.inter_token_latency.observe(gap)


def on_finished(progress: Progress, reason: FinishReason, now: float) -> None:
    """Before the last message is yielded: the caller may close the stream on it."""
    metrics.requests_total.labels("router", "ok").inc()
    _ended(progress, reason.value, now)


def on_cancelled(progress: Progress, now: float) -> None:
    metrics.requests_total.labels("router", "cancelled").inc()
    _ended(progress, FinishReason.ABORT.value, now)


def on_failed() -> None:
    metrics.requests_total.labels("router", "failed").inc()


def _ended(progress: Progress, reason: str, now: float) -> None:
    metrics.request_success.labels(reason).inc()
    metrics.e2e_request_latency.observe(now - progress.start)
    metrics.request_prompt_tokens.observe(len(progress.prompt))
    metrics.request_generation_tokens.observe(len(progress.sent))
