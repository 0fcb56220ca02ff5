"""The `pdserve` command.

    pdserve up         a local cluster (router, prefill and decode nodes) on loopback
    pdserve prefill    a prefill node
    pdserve decode     a decode node
    pdserve router     the router, over given prefill and decode nodes
    pdserve gateway    the OpenAI HTTP API over a router
    pdserve generate   answer one prompt, through a router (--router) or in this process
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import os
import signal
import sys
import time

# Only the config dataclasses here: `pdserve --help` must not import torch or gRPC. Each
# subcommand imports what it runs.
from pdserve.config_args import add_config_args, config_from_args
from pdserve.decode_node.config import DecodeNodeConfig
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.senders import CONNECTORS
from pdserve.prefill_node.config import PrefillNodeConfig
from pdserve.router.config import GatewayConfig, RouterConfig

SAMPLE_CHAT = "Give me three short tips for writing clear code."
DEFAULT_ROUTER = "127.0.0.1:50051"
NOT_FLAGS = ("keep_logits", "kv_cache_shared")  # EngineConfig fields no command line sets (the decode node sets the last)

HELP = {
    "model": "a Hugging Face directory, a .gguf file, smollm2-135m, or dummy:<preset|config.json>",
    "device": "cpu or cuda[:N] (pdserve up: also a comma-separated list the nodes take in turn, "
              "prefill nodes first; plain cuda spreads them over every GPU)",
    "dtype": "auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16",
    "block_size": "tokens per KV block",
    "num_kv_blocks": "KV blocks to allocate (none: from --kv-cache-memory-gb)",
    "kv_cache_memory_gb": "KV cache size (none: 1 GiB on CPU; on CUDA what --gpu-memory-utilization "
                          "leaves after the weights and the largest step's activations)",
    "gpu_memory_utilization": "share of the GPU's memory this node may use (pdserve up splits it "
                              "between nodes on one GPU)",
    "enforce_eager": "no CUDA graphs for decode steps",
    "num_threads": "CPU: torch's threads for this node (pdserve up gives each CPU node its part of the "
                   "cores; none: every core)",
    "max_graph_batch_size": "decode batches up to this size replay CUDA graphs captured at start-up",
    "async_scheduling": "launch each decode step before the host has read the previous step's "
                        "tokens, so the GPU does not wait for the host (false: one step at a time)",
    "max_num_batched_tokens": "token budget of one engine step (chunked prefill)",
    "port": "gRPC port (0: any free port)",
    "metrics_port": "Prometheus /metrics port (0: any free port)",
    "otlp_endpoint": "send OpenTelemetry traces to this OTLP/gRPC collector (host:port, or https://host:port; "
                     "default: no tracing)",
    "ready_file": "write the bound ports here as JSON once serving (for launchers)",
    "kv_host": "interface the KV receiver binds to",
    "kv_advertise_host": "host prefill nodes dial for KV (default: --kv-host)",
    "reservation_timeout_s": "free reserved blocks whose KV has not begun to arrive after this long",
    "max_queued_requests": "requests that may wait for KV blocks; past that the node answers "
                           "RESOURCE_EXHAUSTED (HTTP 429)",
    "prefill_nodes": "comma-separated host:port of prefill nodes",
    "decode_nodes": "comma-separated host:port of decode nodes",
    "policy": "routing policy: round_robin, load or prefix (needs --redis-url)",
    "redis_url": "Redis for the prefix index and node registry, e.g. redis://host:6379/0",
    "advertise_host": "host routers dial for this node's gRPC (default: --host)",
    "node_id": "id in the Redis registry (default: <role>-<advertise host>:<port>)",
    "heartbeat_interval_s": "seconds between heartbeats to Redis",
    "heartbeat_ttl_s": "a node whose heartbeat is older than this is dropped",
    "heartbeat_grace_s": "after Redis comes up, how long nodes may take to re-register",
    "kv_test_corrupt_transfers": "test hook: corrupt the first N KV transfers",
    "kv_test_hold_prefill_s": "test hook: each prompt waits this long before its prefill (as if queued)",
    "kv_connector": "how prefill nodes send this node KV: tcp, nccl (a process group per "
                    "node pair: NCCL between GPUs, gloo between CPU processes), or ipc (a prefill node on "
                    "this host writes the blocks itself: CUDA IPC on a shared GPU, shared memory on CPU; "
                    "tcp from elsewhere)",
    "kv_connect_timeout_s": "seconds to connect (and pair) with a decode node's KV receiver",
    "kv_transfer_timeout_s": "seconds a KV transfer may take (prefill: to leave once its last layer "
                             "is queued; decode: to land once its first bytes came)",
    "device_turns": "with a prefill and a decode node on one GPU (or one host's cores): prefill-first "
                    "(their steps take turns, prefill first, as one engine orders them) or off (the "
                    "device time-slices the two processes)",
    "disaggregation": "where prompts are prefilled: always (on prefill nodes), never (decode nodes "
                      "prefill them: aggregated serving) or auto (on a prefill node while one is healthy)",
    "prefill_here_max_tokens": "with --disaggregation auto: prefill a prompt on its decode node when at "
                               "most this many of its tokens are not in that node's prefix cache, and fewer "
                               "than the prefill node would compute (0: only when no prefill node is healthy)",
    "stream_timeout_s": "seconds a decode stream may stay silent (its node sends a heartbeat every second "
                        "while a request waits) before the request resumes on another node",
    "resume_wait_s": "seconds a request under way that finds no healthy node to resume on waits for one "
                     "to come back (a restarting node) before it fails (a new request fails at once)",
    "router": "the routers' gRPC addresses, comma-separated (a stream whose router goes away resumes on "
              "the next)",
    "api_key": "require this key, or one of several comma-separated (Authorization: Bearer): on the "
               "gateway's /v1/*, on the router's Generate",
    "cache_isolation": "shared (every client shares the prefix cache; a client may send cache_salt) or "
                       "per-key (each API key's prefix cache apart)",
    "served_model_name": "the model name clients send (default: the router's --model)",
    "request_timeout_s": "a request running longer than this is cancelled",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with disaggregated "
                                     "prefill and decode")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run a local cluster on loopback (Ctrl-C stops it)")
    up.add_argument("--num-prefill", type=int, default=1, help="prefill nodes (default 1)")
    up.add_argument("--num-decode", type=int, default=1, help="decode nodes (default 1)")
    up.add_argument("--port", type=int, default=50051, help="the router's gRPC port (default 50051)")
    up.add_argument("--http-port", type=int, default=8000, help="the OpenAI HTTP gateway's port "
                    "(default 8000; -1: no gateway)")
    up.add_argument("--base-port", type=int, default=None, help="fixed ports for the nodes from this one "
                    "up: each node's gRPC, metrics (and a decode node's KV) port in turn, then the router's "
                    "metrics port (default: any free ones; the banner lists every endpoint)")
    up.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"), help="require this key (or one "
                    "of several, comma-separated) on the gateway's /v1/* and the router's Generate (env "
                    "PDSERVE_API_KEY; they get it in their environment)")
    up.add_argument("--policy", default="prefix", help="routing policy: round_robin, load or "
                    "prefix (default prefix)")
    up.add_argument("--redis-url", default=None, help="use this Redis for the prefix index and "
                    "registry (default: start a local redis-server)")
    up.add_argument("--no-redis", action="store_true", help="no Redis: the router gets the nodes "
                    "as flags and routes by load")
    up.add_argument("--no-sample", action="store_true", help="do not answer a sample chat once up")
    up.add_argument("--kv-connector", default="ipc", choices=CONNECTORS, help="how KV moves "
                    "from prefill to decode nodes (default ipc: the prefill node writes it into the decode "
                    "node's blocks in place, every node being on this host; tcp; nccl: NVLink between GPUs, "
                    "gloo on CPU)")
    add_config_args(up, EngineConfig, HELP, exclude=NOT_FLAGS)
    roles = {"prefill": (PrefillNodeConfig, "a prefill node"), "decode": (DecodeNodeConfig, "a decode node")}
    for name, (cls, text) in roles.items():
        p = sub.add_parser(name, help=f"run {text}")
        add_config_args(p, EngineConfig, HELP, exclude=NOT_FLAGS)
        add_config_args(p, cls, HELP)
    router = sub.add_parser("router", help="run the router")
    add_config_args(router, RouterConfig, HELP)
    gateway = sub.add_parser("gateway", help="run the OpenAI HTTP API over a router")
    add_config_args(gateway, GatewayConfig, HELP)
    gen = sub.add_parser("generate", help="answer one prompt (through --router, or in this process)")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.add_argument("--router", default=None, help=f"router address, e.g. {DEFAULT_ROUTER} "
                     "(default: run the engine in this process)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    add_config_args(gen, EngineConfig, HELP, exclude=NOT_FLAGS)
    sub.add_parser("bench", add_help=False, help="the serving benchmark: a rate sweep and a burst against a "
                   "local cluster and the in-process engine, latency percentiles, goodput, JSON and plots "
                   "(pdserve bench --help)")
    check = sub.add_parser("health", help="ask a router's or node's gRPC health (exit 0 when SERVING): "
                           "a probe that speaks TLS, which Kubernetes' own gRPC probe does not")
    check.add_argument("address", help="host:port of its gRPC port")
    for p in (router, gateway, *(sub.choices[n] for n in roles)):
        p.epilog = ("The cluster secret that the components prove to each other is read from the environment only "
                    "(env PDSERVE_CLUSTER_SECRET; the same value, 16+ characters, on every component; needed to "
                    "listen on anything but loopback). TLS on every port, off unless set (service/tls.py): "
                    "env PDSERVE_TLS_CERT; env PDSERVE_TLS_KEY; (PEM files) env PDSERVE_TLS_CA; (the CA "
                    "peers are checked against) env PDSERVE_TLS_SERVER_NAME; (the name their certificates "
                    "carry) env PDSERVE_TLS_KV; (off: the KV connector in plain text).")
    for p in (up, router, gateway, gen, check, *(sub.choices[n] for n in roles)):
        p.add_argument("--log-level", default="WARNING" if p in (up, gen) else "INFO",
                       help="logging level")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # a program of its own, with its own flags
        os.execv(sys.executable, [sys.executable, "-m", "pdserve.bench.serving", *argv[1:]])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "up":
            return run_up(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "health":
            return run_health(args.address)
        if args.command == "router":
            from pdserve.router.node import serve
            asyncio.run(serve(config_from_args(RouterConfig, args)))
        elif args.command == "gateway":
            from pdserve.router.gateway import serve
            asyncio.run(serve(config_from_args(GatewayConfig, args)))
        else:
            module = importlib.import_module(f"pdserve.{args.command}_node.node")
            asyncio.run(module.serve(config_from_args(EngineConfig, args),
                                     config_from_args(roles[args.command][0], args)))
        return 0
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def engine_flags(config: EngineConfig) -> list[str]:
    """The EngineConfig as flags for a node process."""
    flags = []
    for f in dataclasses.fields(config):
        if f.name not in NOT_FLAGS:
            value = getattr(config, f.name)
            flags += [f"--{f.name.replace('_', '-')}", "none" if value is None else str(value).lower()
                      if isinstance(value, bool) else str(value)]
    return flags


def run_up(args) -> int:
    from pdserve.cluster import Cluster

    config = config_from_args(EngineConfig, args)
    redis = None if args.no_redis else args.redis_url or "local"
    device_args = node_device_args(config, node_devices(config.device, args.num_prefill + args.num_decode))
    cluster = Cluster(config.model, args.num_prefill, args.num_decode, args.port,
                      node_args=engine_flags(config), router_args=["--policy", args.policy], redis=redis,
                      prefill_args=device_args[:args.num_prefill],
                      decode_args=[[*a, "--kv-connector", args.kv_connector]
                                   for a in device_args[args.num_prefill:]],
                      gateway_port=None if args.http_port < 0 else args.http_port,
                      api_key=args.api_key, base_port=args.base_port)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    # Ctrl-C stops the cluster even when this process was started with SIGINT ignored (an
    # ignored signal stays ignored across exec, and Python then installs no handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster.start(progress=lambda m: print(f"pdserve: {m}", file=sys.stderr))
        address = cluster.router_address
        env = "PDSERVE_API_KEY=<key> " if args.api_key else ""
        grpc_key = "-H 'authorization: Bearer <key>' " if args.api_key else ""
        tls = cluster.tls
        plaintext = (f"-cacert {tls.ca_file}" if tls.ca_file else "") if tls.dials else "-plaintext"
        cacert = f" --cacert {tls.ca_file}" if tls.ca_file else ""
        print(f"\npdserve is up: router at {address} (gRPC, pdserve.v1.RouterService/Generate)\n"
              f"  try:  {env}.venv/bin/pdserve generate --router {address} \"What is the capital of France?\"\n"
              f"  or:   grpcurl {plaintext} {grpc_key}-d '{{\"messages\": {{\"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"Hi!\"}}]}}, \"sampling\": {{\"temperature\": 0, \"max_tokens\": 64}}}}' "
              f"{address} pdserve.v1.RouterService/Generate", file=sys.stderr)
        if cluster.gateway is not None:
            key = f" -H 'Authorization: Bearer {args.api_key.split(',')[0]}'" if args.api_key else ""
            print(f"  or:   curl{cacert} {cluster.gateway_url}/chat/completions -H 'Content-Type: application/json'"
                  f"{key} -d '{{\"model\": \"{cluster.gateway.info['model']}\", \"messages\": "
                  f"[{{\"role\": \"user\", \"content\": \"Hi!\"}}], \"max_tokens\": 64}}'\n"
                  f"  (the OpenAI API at {cluster.gateway_url})", file=sys.stderr)
        print("  endpoints:\n" + "\n".join(f"    {what:<40} {where}" for what, where in cluster.endpoints()), file=sys.stderr)
        print(f"  logs: {cluster.log_dir}    stop: Ctrl-C\n", file=sys.stderr)
        if not args.no_sample:
            stream_answer(address, SAMPLE_CHAT, raw=False, max_tokens=96, temperature=0.0)
        while all(p.popen.poll() is None for p in cluster.processes):
            time.sleep(0.5)
        dead = next(p for p in cluster.processes if p.popen.poll() is not None)
        print(f"pdserve: {dead.name} exited ({dead.popen.returncode}):\n{dead.log_tail()}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # ClusterError, or no redis-server to start
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npdserve: stopping ...", file=sys.stderr)
        return 0
    finally:
        cluster.stop()


def node_device_args(config: EngineConfig, devices: list[str]) -> list[list[str]]:
    """Each node's --device, and on a device that several nodes share, each one's even part:
    of --gpu-memory-utilization on a GPU (unless the KV cache has a fixed size), of the
    host's cores on the CPU (unless --num-threads is given): CPU nodes that each took every
    core would oversubscribe them."""
    fixed = config.num_kv_blocks is not None or config.kv_cache_memory_gb is not None
    node_args = []
    for d in devices:
        sharing = devices.count(d)
        if d.startswith("cuda"):
            share = [] if fixed or sharing == 1 else [
                "--gpu-memory-utilization", f"{config.gpu_memory_utilization / sharing:.4f}"]
        else:
            share = [] if config.num_threads is not None else ["--num-threads", str(cpu_share(sharing))]
        node_args.append(["--device", d, *share])
    return node_args


def cpu_share(num_nodes: int) -> int:
    """Each of `num_nodes` CPU nodes' part of this host's cores (one at least)."""
    return max(1, (os.cpu_count() or 1) // num_nodes)


def node_devices(device: str, num_nodes: int) -> list[str]:
    """Each node's device for `pdserve up --device` (prefill nodes first): a comma-separated
    list is taken in turn; plain `cuda` means every visible GPU in turn."""
    devices = [d.strip() for d in device.split(",") if d.strip()]
    if not devices:
        raise ValueError("--device is empty")
    if devices == ["cuda"]:
        import torch
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or devices
    return [devices[i % len(devices)] for i in range(num_nodes)]


def run_health(address: str) -> int:
    from pdserve.client import health

    status = health(address)
    print(status)
    return 0 if status == "SERVING" else 1


def run_generate(args) -> int:
    if args.router:
        return stream_answer(args.router, args.prompt, args.raw, args.max_tokens, args.temperature)
    return run_prompt(config_from_args(EngineConfig, args), args.prompt, args.raw, args.max_tokens,
                      args.temperature)


def stream_answer(address: str, prompt: str, raw: bool, max_tokens: int, temperature: float) -> int:
    """Streams one answer from a router, printing the text as it comes."""
    import grpc

    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.client import generate_request, stream

    request = generate_request(prompt, SamplingParams(temperature=temperature, max_tokens=max_tokens),
                               chat=not raw)
    print(f"> {prompt}\n", file=sys.stderr)
    try:
        for response in stream(address, request, timeout=600):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            if response.finish_reason:
                u, t = response.usage, response.timings
                print(f"\n\n[{u.completion_tokens} tokens, first after {t.time_to_first_token_seconds * 1e3:.0f} ms, "
                      f"{u.completion_tokens / max(t.total_seconds, 1e-9):.1f} tok/s]", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"\npdserve: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def run_prompt(config: EngineConfig, prompt: str, raw: bool, max_tokens: int, temperature: float) -> int:
    from pdserve.engine.engine import Engine
    from pdserve.engine.sampling_params import SamplingParams

    print(f"loading {config.model} on {config.device} ...", file=sys.stderr)
    start = time.monotonic()
    engine = Engine(config)
    print(f"loaded in {time.monotonic() - start:.1f}s", file=sys.stderr)
    if engine.tokenizer is None:
        raise ValueError(f"model {config.model!r} has no tokenizer; use a real model for text prompts")
    tokens = (engine.tokenizer.encode(prompt) if raw
              else engine.tokenizer.encode_chat([{"role": "user", "content": prompt}]))
    request_id = engine.add_request(tokens, SamplingParams(temperature=temperature, max_tokens=max_tokens))
    print(f"> {prompt}\n", file=sys.stderr)
    start, output, printed = time.monotonic(), [], ""
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                output += out.new_token_ids
        text = engine.tokenizer.decode(output)
        if not text.endswith("\ufffd"):  # hold back a half-decoded UTF-8 character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    elapsed = time.monotonic() - start
    print(f"\n\n[{len(output)} tokens in {elapsed:.2f}s, {len(output) / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
