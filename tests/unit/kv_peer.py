"""A connector peer in its own process, for the tests where a peer dies:

    python -m tests.unit.kv_peer send <connector> <ticket json> <num layers>
        sends that many layers of the ticket's transfer (seeded data), then dies without DONE
    python -m tests.unit.kv_peer receive <ticket json minus endpoint>
        serves a receiver expecting the ticket, prints its endpoint, and waits to be killed
"""

import dataclasses
import json
import os
import sys
import time

import torch

from pdserve.kv_transfer.connector import KVTicket


def ticket_to_json(ticket: KVTicket) -> str:
    return json.dumps(ticket.as_json_dict())


def ticket_from_json(text: str) -> KVTicket:
    return KVTicket.from_json_dict(json.loads(text))


def layer_data(ticket: KVTicket, layer: int) -> torch.Tensor:
    return torch.randn(ticket.layer_shape, generator=torch.Generator().manual_seed(layer))


def make_sender(connector: str):
    """`connector`: tcp, nccl (its channel thread posts every group, as on CPU nodes),
    nccl-from-caller (`send_layers` posts what it can itself, as on CUDA nodes), or ipc."""
    from pdserve.kv_transfer.ipc_sender import IpcKVSender
    from pdserve.kv_transfer.nccl import NcclKVSender
    from pdserve.kv_transfer.tcp_sender import TcpKVSender
    if connector == "tcp":
        return TcpKVSender(connect_timeout=5)
    if connector == "ipc":
        return IpcKVSender("cpu", connect_timeout=5)
    return NcclKVSender("cpu", 5, 10, post_from_caller=connector == "nccl-from-caller")


def main(argv: list[str]) -> None:
    if argv[0] == "send":
        ticket, num_layers = ticket_from_json(argv[2]), int(argv[3])
        sender = make_sender(argv[1])
        for layer in range(num_layers):
            sender.send_layer(ticket, layer, layer_data(ticket, layer))
        time.sleep(1.0)  # long enough for the frames to leave
        os._exit(17)  # dies mid-transfer: no DONE, no clean close of the process group
    if argv[0] == "receive":
        from pdserve.kv_transfer.receiver import KVSocketReceiver
        ticket = ticket_from_json(argv[1])
        from pdserve.engine.kv_pool import allocate_kv_caches
        caches = allocate_kv_caches(ticket.num_layers, (ticket.block_size, ticket.num_kv_heads, ticket.head_dim),
                                    max(ticket.block_ids) + 1, torch.float32, torch.device("cpu"))
        receiver = KVSocketReceiver(caches, pair_timeout=10)
        receiver.expect(dataclasses.replace(ticket, kv_endpoint=receiver.endpoint), lambda result: None)
        print(receiver.endpoint, flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1:])
