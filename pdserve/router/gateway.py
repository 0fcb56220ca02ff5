"""`pdserve gateway`: the OpenAI HTTP API (aiohttp) over the router's gRPC API (torch-free).

    POST /v1/completions, /v1/chat/completions   streaming (SSE) or not
    GET  /v1/models, /health, /metrics

Every request is one RouterService.Generate stream; the router tokenizes, applies the chat
template and stop strings, routes and retries. A client that disconnects cancels its handler
(aiohttp handler cancellation), which cancels the gRPC call, which frees the blocks on both
nodes. gRPC statuses become HTTP ones: INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import grpc
import prometheus_client as prom
from aiohttp import web

from pdserve.protos import pdserve_pb2 as pb

from pdserve.service import metrics
from pdserve.service.cluster_auth import ClusterAuth
from pdserve.service.tls import Tls
from pdserve.service.tracing import Tracing

from .api_keys import ApiKeys, bearer_key
from .config import GatewayConfig
from .merged_calls import MergedCall
from .openai_api import (FINISH_REASONS, APIError, Choice, ParsedRequest, chunk_body, parse_request, response_body,
                         total_usage)
from .router_calls import Routers, parse_routers
from .tool_stream import ToolStream, tool_delta

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409}


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.tls = Tls.from_env()  # HTTPS when it serves; to the routers when it dials
        self.routers = Routers(parse_routers(config.router), self.tls)
        self.api_keys = ApiKeys(config.api_key)
        self.cluster_metadata = ClusterAuth.from_env().metadata  # the router knows a member by it
        self.model_name = config.served_model_name
        self.registry = metrics.role_registry("gateway", lambda: self.model_name)
        self.tracing = Tracing("pdserve-gateway", config.otlp_endpoint)
        self.started = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.get("/v1/models", self.models), web.get("/health", self.health),
                        web.get("/metrics", self.metrics)])
        return app

    # ---- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            response = await handler(request)
        except APIError as e:
            response = web.json_response(e.body(), status=e.status, headers=e.headers)
        except web.HTTPException as e:  # aiohttp's own: 404 no route, 405, 413 too large
            response = web.json_response(APIError(e.status, e.reason).body(), status=e.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # a bug: say so, keep serving
            log.exception("unexpected error on %s", request.path)
            response = web.json_response(APIError(500, f"internal error: {e}").body(), status=500)
        metrics.http_requests.labels(request.path if request.match_info.route.resource else "other",
                             str(response.status)).inc()
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """`Authorization: Bearer <key>` on /v1/* when keys are set (the scheme in any case, as
        HTTP has it); a 401 says how to authenticate (WWW-Authenticate)."""
        if self.api_keys.enabled and request.path.startswith("/v1/"):
            if not self.api_keys.valid(bearer_key(request.headers.get("Authorization"))):
                raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="pdserve"'})
        return await handler(request)

    # ---- endpoints ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        info = await self._info()
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.started, "owned_by": "pdserve",
            "root": info.model, "max_model_len": info.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        try:
            info = await self._info()
        except APIError as e:
            return web.json_response({"status": "unavailable", "reason": e.message}, status=503)
        if not info.can_serve:
            return web.json_response({"status": "unavailable", "reason": "the router has no nodes to serve with "
                                      f"({info.num_prefill_nodes} prefill, {info.num_decode_nodes} decode)"},
                                     status=503)
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=prom.generate_latest(self.registry), content_type="text/plain")

    async def _info(self) -> pb.RouterInfo:
        try:
            return await self.routers.info(timeout=2.0)
        except grpc.aio.AioRpcError as e:
            raise APIError(503, f"router at {self.config.router} unavailable: {e.details()}") from None

    # ---- generation ---------------------------------------------------------------------

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = time.perf_counter()
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the request body is not valid JSON: {e}"[:300]) from None
        try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 string may hold
            json.dumps(body, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError):
            raise APIError(400, "the request body holds text that is not valid Unicode (a lone surrogate "
                                "such as \\ud800)") from None
        parsed = parse_request(body, chat, self.model_name)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        span = self.tracing.start(f"gateway POST {request.path}", request.headers, request_id=request_id)
        metadata = self._metadata(request) + self.tracing.metadata(span)
        calls = []
        for i, generate in enumerate([parsed.generate, *parsed.more]):
            generate.request_id = request_id if i == 0 else f"{request_id}-p{i}"
            calls.append(self.routers.generate(generate, self.config.request_timeout_s, metadata))
        call = calls[0] if len(calls) == 1 else MergedCall(calls, parsed.generate.n)
        before_call = time.perf_counter() - arrived
        try:
            if parsed.stream:
                return await self._stream(request, parsed, call, request_id, before_call)
            return await self._collect(parsed, call, request_id)
        finally:
            call.cancel()  # a no-op when it ended; frees the request's blocks when it did not
            span.end()

    def _metadata(self, request: web.Request) -> tuple:
        """The cluster secret, and the client's key (the router salts per-key caches with it)."""
        key = bearer_key(request.headers.get("Authorization"))
        return self.cluster_metadata + ((("authorization", f"Bearer {key}"),) if key else ())

    async def _collect(self, parsed: ParsedRequest, call, request_id: str) -> web.Response:
        choices, usage = await self._gather(parsed, call)
        return web.json_response(response_body(parsed, request_id, int(time.time()), choices, usage))

    async def _gather(self, parsed: ParsedRequest, call) -> tuple[list[Choice], pb.Usage]:
        """Every choice's whole answer and the total usage."""
        choices = [Choice() for _ in range(parsed.num_choices)]
        usages = {}
        try:
            async for response in call:
                choice = choices[response.index]
                choice.add(response)
                if response.finish_reason:
                    choice.finish_reason = FINISH_REASONS.get(response.finish_reason)
                    usages[response.index] = response.usage
        except grpc.aio.AioRpcError as e:
            raise _api_error(e) from None
        return choices, total_usage(usages, parsed.generate.n)

    async def _stream(self, request: web.Request, parsed: ParsedRequest, call, request_id: str,
                      before_call: float) -> web.StreamResponse:
        try:  # wait for the first answer: errors before it are plain HTTP errors
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            raise _api_error(e) from None
        received = time.perf_counter()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache"})
        await out.prepare(request)
        created, response = int(time.time()), first
        started, usages, text_offsets = set(), {}, [0] * parsed.num_choices
        tool_streams = [ToolStream(parsed.tools.mode == "auto") for _ in range(parsed.num_choices)] if parsed.tools else None
        try:
            while response is not grpc.aio.EOF:
                index, finish = response.index, FINISH_REASONS.get(response.finish_reason)
                delta = None
                if tool_streams is not None:
                    delta, finish = tool_delta(tool_streams[index], response.text, finish)
                await _send(out, chunk_body(parsed, request_id, created, response.text, finish,
                                            first=index not in started, token_ids=response.token_ids,
                                            logprobs=response.logprobs, text_offset=text_offsets[index],
                                            index=index, prompt_text=response.prompt_text,
                                            prompt_logprobs=response.prompt_logprobs, delta=delta))
                elapsed = time.perf_counter() - received
                metrics.gateway_added.labels("chunk" if started else "request").observe(
                    elapsed if started else elapsed + before_call)
                started.add(index)
                text_offsets[index] += len(response.prompt_text) + len(response.text)
                if finish is not None:
                    usages[index] = response.usage
                    if parsed.include_usage and len(usages) == parsed.num_choices:
                        await _send(out, chunk_body(parsed, request_id, created, None, None,
                                                    total_usage(usages, parsed.generate.n)))
                response = await call.read()
                received = time.perf_counter()
        except grpc.aio.AioRpcError as e:  # mid-stream: an error chunk, then [DONE]
            await _send(out, _api_error(e).body())
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out


async def _send(out: web.StreamResponse, body: dict) -> None:
    await out.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


def _api_error(error: grpc.aio.AioRpcError) -> APIError:
    status = HTTP_STATUS.get(error.code(), 500)
    return APIError(status, error.details() or error.code().name, code=error.code().name.lower())


async def serve(config: GatewayConfig) -> None:
    """Serves until SIGTERM/SIGINT; the ready file is written once the router has answered."""
    import signal

    from pdserve.service.server import write_ready

    gateway = Gateway(config)
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=gateway.tls.server_context())
    await site.start()
    port = runner.addresses[0][1]
    log.info("gateway listening on %s://%s:%d (router %s)", gateway.tls.scheme, config.host, port, config.router)
    while gateway.model_name is None:  # with --served-model-name it serves (503s) without a router
        try:
            gateway.model_name = (await gateway.routers.info(timeout=2.0)).model
        except grpc.aio.AioRpcError as e:
            log.warning("waiting for the router at %s: %s", config.router, e.details())
            await asyncio.sleep(1.0)
    write_ready(config.ready_file, host=config.host, port=port, role="gateway",
                model=gateway.model_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    gateway.tracing.close()
    await gateway.routers.close()
