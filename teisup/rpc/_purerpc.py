"""The parts of purerpc 0.8.0 that teisup.rpc builds on, with its leaks plugged.

purerpc's connection object (`GRPCProtoSocket`) and its per-call streams are
reused as they are, except for one thing: each stream queues incoming events
on a pair of anyio memory streams that purerpc never closes, and anyio warns
(`ResourceWarning`) whenever one is garbage-collected unclosed. `TidySocket`
gives every stream a trio memory channel instead, which has the same
``send``/``receive`` calls and nothing to close.

It also makes a client connection fail when the server closes it (see
`TidySocket`). Everything here leans on purerpc internals; purerpc is pinned to 0.8.0
exactly, and this module is the only place that needs revisiting on a bump.
"""

from __future__ import annotations

import math
from typing import Any

import trio
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpclib.config import GRPCConfiguration

__all__ = ["TidySocket", "TidyStream", "client_config", "server_config"]


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


class TidySocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """One HTTP/2 gRPC connection (either side) built of `TidyStream`s.

    On the client side, a connection the server closes fails: purerpc's reader
    task returns quietly at end of stream, which leaves every pending call
    waiting for an answer that cannot come. Raising there instead fails the
    reader's task group, which cancels the code using the connection.
    """

    StreamClass = TidyStream

    async def _reader_thread(self) -> None:
        await super()._reader_thread()
        raise ConnectionResetError("the server closed the connection")


def client_config() -> Any:
    """A fresh client-side purerpc configuration (its defaults: 32 MiB messages)."""
    return GRPCConfiguration(client_side=True)


def server_config() -> Any:
    """A fresh server-side purerpc configuration."""
    return GRPCConfiguration(client_side=False)
