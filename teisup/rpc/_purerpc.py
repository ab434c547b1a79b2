"""The parts of purerpc 0.8.0 that teisup.rpc builds on, with its leaks plugged.

purerpc's connection object (`GRPCProtoSocket`) and its per-call streams are
reused as they are, except for one thing: each stream queues incoming events
on a pair of anyio memory streams that purerpc never closes, and anyio warns
(`ResourceWarning`) whenever one is garbage-collected unclosed. `TidySocket`
gives every stream a trio memory channel instead, which has the same
``send``/``receive`` calls and nothing to close.

It also makes a client connection fail when the server closes it (see
`TidySocket`), and turns a message over the size limit into a
RESOURCE_EXHAUSTED status for that one call, where purerpc raises from its
connection reader and so drops the connection and every call on it
(`TidyConnection`). Everything here leans on purerpc internals; purerpc is
pinned to 0.8.0 exactly, and this module is the only place that needs
revisiting on a bump.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import trio
from purerpc import RpcFailedError, Status, StatusCode
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import SocketWrapper
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived, RequestEnded, ResponseEnded
from purerpc.grpclib.exceptions import MessageTooLargeError

__all__ = [
    "DEFAULT_MAX_MESSAGE_LENGTH",
    "MAX_MESSAGE_LENGTH_LIMIT",
    "TidyConnection",
    "TidySocket",
    "TidyStream",
    "client_config",
    "server_config",
]

DEFAULT_MAX_MESSAGE_LENGTH = 32 * 1024 * 1024
"""purerpc's default limit on one message, each way."""

MAX_MESSAGE_LENGTH_LIMIT = 1023 * 1024 * 1024
"""The largest limit purerpc can take: it advertises an HTTP/2 window of twice
the limit, and a window must stay under 2**31 bytes."""


@dataclass(frozen=True, slots=True)
class MessageTooLarge:
    """A purerpc-style event: the peer sent ``stream_id`` a message over the limit."""

    stream_id: int
    message: str


class _Discard:
    """A stream's read buffer once it has refused a message: it swallows the rest."""

    def __init__(self, connection: GRPCConnection, stream_id: int) -> None:
        self._connection = connection
        self._stream_id = stream_id

    def data_received(self, data: bytes, flow_controlled_length: int | None = None) -> None:
        # Hand the window back, or a client still sending the refused message
        # would stall the whole connection once its window is spent.
        length = flow_controlled_length if flow_controlled_length is not None else len(data)
        if length:
            self._connection.h2_connection.acknowledge_received_data(length, self._stream_id)

    def read_all_complete_messages_flowcontrol(self) -> list[Any]:
        return []


class TidyConnection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's protocol state machine, with over-size messages refused per call."""

    def _data_received(self, event: Any) -> list[Any]:
        try:
            return list(super()._data_received(event))
        except MessageTooLargeError as exc:
            self.message_read_buffers[event.stream_id] = _Discard(self, event.stream_id)
            # The bytes of this frame that were buffered are spent: return them.
            self.h2_connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            return [MessageTooLarge(event.stream_id, str(exc))]


class TidyStream(GRPCProtoStream):  # type: ignore[misc]  # purerpc is untyped
    """A purerpc stream whose event queue leaves nothing to close."""

    _incoming_events: Any

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        for end in self._incoming_events:
            end.close()
        # Unbounded, as purerpc's own queue is: the HTTP/2 flow-control window
        # is what bounds how much a peer can push at us.
        self._incoming_events = trio.open_memory_channel[Any](math.inf)

    async def receive_event(self) -> Any:
        # purerpc's GRPCProtoStream.receive_event, reading through our _receive
        # (purerpc's calls GRPCStream._receive by super(), skipping overrides).
        event = await self._receive()
        if isinstance(event, MessageReceived) and hasattr(self, "_incoming_message_type"):
            binary = event.data
            event.data = self._incoming_message_type()
            event.data.ParseFromString(binary)
        return event

    async def _receive(self) -> Any:
        # purerpc's own, plus the MessageTooLarge event.
        event = await self._incoming_events[1].receive()
        if isinstance(event, MessageTooLarge):
            raise RpcFailedError(Status(StatusCode.RESOURCE_EXHAUSTED, event.message))
        if isinstance(event, MessageReceived):
            self._grpc_connection.acknowledge_received_data(
                self._stream_id, event.flow_controlled_length
            )
            await self._socket.flush()
        elif isinstance(event, (RequestEnded, ResponseEnded)):
            self._end_stream_event = event
        else:
            self._start_stream_event = event
        return event


class TidySocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """One HTTP/2 gRPC connection (either side) built of `TidyStream`s.

    On the client side, a connection the server closes fails: purerpc's reader
    task returns quietly at end of stream, which leaves every pending call
    waiting for an answer that cannot come. Raising there instead fails the
    reader's task group, which cancels the code using the connection.
    """

    StreamClass = TidyStream

    def __init__(self, config: Any, sock: Any) -> None:
        super().__init__(config, sock)
        self._grpc_connection = TidyConnection(config=config)
        self._socket = SocketWrapper(self._grpc_connection, sock)

    async def _reader_thread(self) -> None:
        await super()._reader_thread()
        raise ConnectionResetError("the server closed the connection")


def client_config(max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH) -> Any:
    """A fresh client-side purerpc configuration."""
    return GRPCConfiguration(client_side=True, max_message_length=max_message_length)


def server_config(max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH) -> Any:
    """A fresh server-side purerpc configuration."""
    return GRPCConfiguration(client_side=False, max_message_length=max_message_length)
