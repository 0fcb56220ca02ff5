"""The router's and the HTTP gateway's settings (flags and PDSERVE_* variables);
importing this is cheap."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    model: str = "smollm2-135m"  # for the tokenizer and vocabulary; the nodes hold the weights
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400
    prefill_nodes: str = ""  # comma-separated host:port (static; Redis may add more)
    decode_nodes: str = ""
    redis_url: str | None = None  # the prefix index and node registry
    policy: str = "prefix"  # round_robin | load | prefix
    heartbeat_grace_s: float = 10.0  # after Redis comes up: time for nodes to re-register
    # where prompts are prefilled: always on a prefill node (disaggregated), never (the decode
    # node prefills: aggregated), or auto (on a prefill node while one is healthy)
    disaggregation: str = "auto"
    # auto: a prompt with at most this many tokens its decode node does not hold in its prefix
    # cache, and fewer than the prefill node would compute, is prefilled there (chats whose
    # history it holds, short prompts while the prefill nodes are busy); 0: only when no
    # prefill node is healthy. The default is measured (benchmarks/results/h100-modes-issue30):
    # as good as the better pure mode on short prompts and chats, with less KV moved.
    prefill_here_max_tokens: int = 512
    max_attempts: int = 3  # per request: the first try plus retries/resumes on other pairs
    # a decode stream silent this long (its node sends a heartbeat every second while a request
    # waits) is a hung node: the request resumes elsewhere as after a crash
    stream_timeout_s: float = 10.0
    # a request under way (an attempt ran) that finds no healthy node to resume on waits this long
    # for one to come back (a restarting node) before it fails; a new request fails at once (503)
    resume_wait_s: float = 60.0
    health_interval_s: float = 0.5
    drain_timeout_s: float = 30.0
    ready_file: str | None = None
    api_key: str | None = None  # one or several (comma-separated): Generate needs one of them when set
    cache_isolation: str = "shared"  # shared | per-key: each API key's prefix cache apart (api_keys.py)
    otlp_endpoint: str | None = None  # OpenTelemetry traces to this OTLP/gRPC collector (service/tracing.py)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    router: str = "127.0.0.1:50051"  # one or several (comma-separated): a stream outlives its router
    api_key: str | None = None  # one or several (comma-separated): "Authorization: Bearer <key>" on /v1/*
    served_model_name: str | None = None  # default: the router's --model
    request_timeout_s: float = 600.0
    ready_file: str | None = None
    otlp_endpoint: str | None = None  # OpenTelemetry traces to this OTLP/gRPC collector (service/tracing.py)
