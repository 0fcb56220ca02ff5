"""A small gRPC client of the router, for `pdserve generate --router` and the tests."""

from __future__ import annotations

import os
from collections.abc import Iterator


import grpc

from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.service.convert import sampling_to_proto
from pdserve.service.tls import Tls


def generate_request(prompt, params: SamplingParams | None = None, chat: bool = False,
                     request_id: str = "", cache_salt: str = "") -> pb.GenerateRequest:
    """`prompt`: a string (raw text, or one user message with chat=True), or token ids."""
    msg = pb.GenerateRequest(request_id=request_id, cache_salt=cache_salt,
                             sampling=sampling_to_proto(params or SamplingParams()))
    if isinstance(prompt, str) and chat:
        msg.messages.messages.add(role="user", content=prompt)
    elif isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.ids.extend(prompt)
    return msg


def stream(address: str, request: pb.GenerateRequest, timeout: float | None = None,
           api_key: str | None = None) -> Iterator[pb.GenerateResponse]:
    """`api_key` (default: the first of $PDSERVE_API_KEY) goes as `authorization: Bearer`."""
    key = api_key if api_key is not None else os.environ.get("PDSERVE_API_KEY", "").split(",")[0].strip()
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with Tls.from_env().channel(address, aio=False) as channel:
        yield from pb_grpc.RouterServiceStub(channel).Generate(request, timeout=timeout, metadata=metadata)


def health(address: str, timeout: float = 5.0) -> str:
    """A gRPC server's health: SERVING, NOT_SERVING, or why it did not answer (TLS as the
    environment says: service/tls.py)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with Tls.from_env().channel(address, aio=False) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
