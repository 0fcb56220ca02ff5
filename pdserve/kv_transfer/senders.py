"""The prefill node's sender: every connector it can speak, each ticket sent by the one its
decode node asked for (`KVTicket.connector`), each made on first use."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

from .connector import KVSender, KVTicket

CONNECTORS = ("tcp", "nccl", "ipc")


class SenderByConnector(KVSender):
    def __init__(self, factories: dict[str, Callable[[], KVSender]]):
        self.factories = factories
        self.senders: dict[str, KVSender] = {}
        self._lock = threading.Lock()

    def supports(self, connector: str) -> bool:
        return connector in self.factories

    def send_layer(self, ticket: KVTicket, layer: int, kv) -> None:
        self._sender(ticket).send_layer(ticket, layer, kv)

    def send_layers(self, layer: int, items: list[tuple[KVTicket, object]]) -> None:
        by_connector: dict[str, list] = {}
        for ticket, kv in items:
            by_connector.setdefault(ticket.connector, []).append((ticket, kv))
        for connector_items in by_connector.values():
            self._sender(connector_items[0][0]).send_layers(layer, connector_items)

    def finish(self, ticket: KVTicket, first_token_id: int) -> concurrent.futures.Future:
        return self._sender(ticket).finish(ticket, first_token_id)

    def abort(self, ticket: KVTicket) -> None:
        self._sender(ticket).abort(ticket)

    def close(self) -> None:
        with self._lock:
            senders, self.senders = list(self.senders.values()), {}
        for sender in senders:
            sender.close()

    def _sender(self, ticket: KVTicket) -> KVSender:
        with self._lock:
            sender = self.senders.get(ticket.connector)
            if sender is None:
                sender = self.senders[ticket.connector] = self.factories[ticket.connector]()
            return sender
