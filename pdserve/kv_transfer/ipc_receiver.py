"""The receiver's half of the `ipc` connector (the sender: ipc_sender.py): a sender on this
host that opened the pool (`KVSocketReceiver.ipc_descriptor`) writes a transfer's blocks
itself, so its connection carries only CLAIM, then LANDED or ABORT. A CLAIM is GRANTed while
the ticket is live and has had no frame, and from then the blocks are the sender's to write
until its LANDED or ABORT, or its connection closes (claims.py: who may free them). LANDED
settles the transfer at once: the sender sent it only after its writes had run."""

from __future__ import annotations

from .connector import TransferResult
from .frame import DONE, FrameError, FrameHeader, FrameType, bare_frame


class IpcFrames:
    def __init__(self, receiver):
        self.receiver = receiver

    def on_claim(self, conn, header: FrameHeader) -> None:
        """A CLAIM: GRANT if the transfer is live, asks for the ipc connector and has had no
        frame yet (its blocks are this sender's to write until its LANDED or ABORT), else DENY.
        A claim that is not proven closes the connection (FrameError)."""
        if header.num_bytes:
            raise FrameError("CLAIM frame with a payload")
        incoming = self.receiver.proven(conn, header)
        granted = (incoming is not None and incoming.ticket.connector == "ipc" and incoming.started_at is None
                   and self.receiver.claims.grant(header.transfer_id, conn))
        if granted:
            self.receiver.track(conn, [incoming])  # its deadline is now the transfer's, from here
        secret = incoming.ticket.secret if incoming is not None else b""
        conn.sock.sendall(bare_frame(FrameType.GRANT if granted else FrameType.DENY, header.transfer_id, secret))

    def end_claim(self, conn, header: FrameHeader) -> None:
        """A LANDED or ABORT on the connection that holds the transfer's claim (which proved
        the ticket when it claimed), whether or not anyone still expects the transfer: its
        writes have all run."""
        if self.receiver.claims.holder(header.transfer_id) is conn:
            self.receiver.claims.end(header.transfer_id)

    def on_landed(self, incoming, payload: memoryview, conn) -> None:
        """The in-place writes of every layer have run (the sender waited for them)."""
        first_token_id, num_layers, _ = DONE.unpack(payload)
        if incoming.conn is not conn or incoming.ticket.connector != "ipc":
            return self.receiver.fail(incoming, "LANDED from a sender that was not granted the transfer")
        if num_layers != incoming.ticket.num_layers:
            return self.receiver.fail(incoming, f"{num_layers} of {incoming.ticket.num_layers} layers written")
        incoming.num_bytes += num_layers * incoming.ticket.layer_bytes  # what moved, if not over the socket
        self.receiver.settle(incoming, TransferResult(incoming.ticket.transfer_id, True, first_token_id,
                                                      num_bytes=incoming.num_bytes, in_place=True))
