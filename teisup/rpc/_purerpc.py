"""The parts of purerpc 0.8.0 that teisup.rpc builds on, with its leaks plugged.

purerpc's connection object (`GRPCProtoSocket`) and its per-call streams are
reused as they are, except for one thing: each stream queues incoming events
on a pair of anyio memory streams that purerpc never closes, and anyio warns
(`ResourceWarning`) whenever one is garbage-collected unclosed. `TidySocket`
gives every stream a plain queue instead (`_Events`), with nothing to close.

It also makes a client connection fail when the server closes it (see
`TidySocket`), acts on a peer's RST_STREAM, which purerpc ignores (see
`_Inbox`), and turns a message over the size limit into a
RESOURCE_EXHAUSTED status for that one call, where purerpc raises from its
connection reader and so drops the connection and every call on it
(`TidyConnection`). Everything here leans on purerpc internals; purerpc is
pinned to 0.8.0 exactly, and this module is the only place that needs
revisiting on a bump.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio.abc
import trio
from anyio.streams.tls import TLSStream
from h2.connection import H2Connection
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from h2.stream import H2Stream
from h2.utilities import _SECURE_HEADERS, CONNECTION_HEADERS
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import WindowUpdateFrame  # type: ignore[import-untyped]
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState, SocketWrapper
from purerpc.grpclib.buffers import MessageWriteBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived, RequestEnded, ResponseEnded
from purerpc.grpclib.exceptions import MessageTooLargeError

from ._hpack import remember, remember_header_blocks
from .errors import RpcStatusError
from .status import StatusCode

__all__ = [
    "DEFAULT_MAX_MESSAGE_LENGTH",
    "MAX_MESSAGE_LENGTH_LIMIT",
    "TidyConnection",
    "TidySocket",
    "TidyStream",
    "client_config",
    "outbound_metadata",
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


@dataclass(frozen=True, slots=True)
class StreamReset:
    """A purerpc-style event: the peer reset ``stream_id`` (RST_STREAM)."""

    stream_id: int
    error_code: int


class _Events:
    """A stream's queue of incoming events, read by one task at a time.

    What purerpc kept in an anyio memory stream, and a trio memory channel
    after it: making either cost more per call than the rest of a stream's
    set-up. Unbounded, as purerpc's own queue is: the HTTP/2 flow-control
    window is what bounds how much a peer can push at us.
    """

    __slots__ = ("_queue", "_reader")

    def __init__(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._reader: trio.lowlevel.Task | None = None

    def put(self, event: Any) -> None:
        self._queue.append(event)
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)

    def receive_nowait(self) -> Any:
        """The next event, or `trio.WouldBlock` when none is queued."""
        if not self._queue:
            raise trio.WouldBlock
        return self._queue.popleft()

    async def receive(self) -> Any:
        """The next event, once one is queued."""
        if self._queue:
            await trio.lowlevel.checkpoint()
        while not self._queue:  # woken, then emptied by a reset: wait again
            if self._reader is not None:
                raise trio.BusyResourceError("another task is reading this stream")
            self._reader = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._reader = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._queue.popleft()


class _Inbox:
    """A stream's incoming-event queue that also acts on a reset as it arrives.

    purerpc drops RST_STREAM, so a call the client cancels kept running (and
    holding its backend slot) until its deadline, and a stream the server
    reset left its client waiting forever.
    """

    def __init__(self, stream: TidyStream, events: _Events) -> None:
        self._stream = stream
        self._events = events

    async def send(self, event: Any) -> None:
        if isinstance(event, StreamReset):
            self._stream.was_reset(event)
            if self._stream.reset is None:
                return  # a clean end after the answer: nothing to report
        elif isinstance(event, ResponseEnded):
            self._stream.answer_arrived()
        self._events.put(event)


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


def _buffered(buffer: Any) -> int:
    """Received bytes a stream's read buffer holds that were never acknowledged."""
    if buffer is None or isinstance(buffer, _Discard):
        return 0  # _Discard acknowledges as it goes
    pending = sum(length for _, length in buffer._buffer._deque)
    if buffer._message_length is not None:
        pending += buffer._flow_controlled_length or 0  # the header of a partial message
    pending += sum(length for _, length in buffer._messages)
    return int(pending)


def outbound_metadata(pairs: Iterable[tuple[str, Any]]) -> tuple[Any, ...]:
    """Custom metadata as h2's outbound normalisation would send it, done once here.

    Names lower-cased and values stripped, connection-specific headers
    (RFC 9113 §8.2.2) dropped, credentials never indexed by HPACK. Everything
    else a connection sends is built lower-case by purerpc and teisup, so h2's
    own normalisation (a pipeline of generators over every header of every
    block) is switched off.
    """
    out: list[Any] = []
    for name, value in pairs:
        name = name.strip().lower()
        if name in CONNECTION_HEADERS:
            continue
        if isinstance(value, str):  # a -bin value is raw bytes: base64-encoded later, as is
            value = value.strip()
        if name in _SECURE_HEADERS or (name == "cookie" and len(value) < 20):
            out.append(NeverIndexedHeaderTuple(name, value))
        else:
            out.append((name, value))
    return tuple(out)


class _RememberingStream(H2Stream):  # type: ignore[misc]  # h2 is untyped
    """h2's stream, validating a received header block once per distinct block.

    h2 runs every received block through a pipeline of generators (pseudo
    headers, case, whitespace, connection headers, authority, path) that
    depends only on the headers and the stream's validation flags; a block
    seen before on this connection takes the first answer. One that fails
    validation raises as before, and is not remembered.
    """

    _validated: dict[tuple[Any, ...], list[Any]]

    def _process_received_headers(
        self, headers: Any, header_validation_flags: Any, header_encoding: Any
    ) -> list[Any]:
        block = tuple(headers)
        key = (block, header_validation_flags, header_encoding)
        processed = self._validated.get(key)
        if processed is None:
            processed = super()._process_received_headers(
                block, header_validation_flags, header_encoding
            )
            remember(self._validated, key, processed)
        return list(processed)


class _LenientH2Connection(H2Connection):  # type: ignore[misc]  # h2 is untyped
    """h2 3.x, minus one strictness: a WINDOW_UPDATE for a closed stream is ignored.

    RFC 9113 §6.9 allows a peer to send one after the stream ended (a server
    acknowledging request data it read after answering); h2 < 4 makes it a
    connection error, which would take every call on the connection down.
    Its streams are `_RememberingStream`s.
    """

    _validated: dict[tuple[Any, ...], list[Any]]

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _RememberingStream
        stream._validated = self._validated
        return stream

    def _receive_window_update_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_window_update_frame(frame)
        except (StreamClosedError, StreamIDTooLowError):
            if frame.stream_id:
                return [], []
            raise


class TidyConnection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's protocol state machine, with over-size messages refused per call
    and resets passed on (as `StreamReset`) for the streams still open."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        h2_connection = self.h2_connection
        h2_connection.__class__ = _LenientH2Connection
        h2_connection._validated = {}
        remember_header_blocks(h2_connection)
        # What we send is built here and in purerpc, names lower-case already,
        # and metadata a caller or handler adds goes through
        # `outbound_metadata`; checking and normalising every outgoing block
        # again cost more per call than encoding it. What the peer sends is
        # still validated (once per distinct block: `_RememberingStream`).
        h2_connection.config.validate_outbound_headers = False
        h2_connection.config.normalize_outbound_headers = False
        # h2 dispatches frames through bound methods it stored at creation.
        h2_connection._frame_dispatch_table[WindowUpdateFrame] = (
            h2_connection._receive_window_update_frame
        )

    #: The socket's open streams (its ``_streams``), set by `TidySocket`.
    streams: dict[int, Any] = {}  # noqa: RUF012 - replaced per instance

    def _stream_reset(self, event: Any) -> list[Any]:
        if event.stream_id not in self.streams:
            return []  # a stream we are done with: purerpc would fail on it
        buffer = self.message_read_buffers.pop(event.stream_id, None)
        self.give_back(event.stream_id, _buffered(buffer))
        return [StreamReset(event.stream_id, int(event.error_code))]

    def give_back(self, stream_id: int, length: int) -> None:
        """Return ``length`` received bytes nobody will read to the connection's window.

        Without this, a stream dropped with unread data shrinks the peer's
        sending window for good, until the whole connection stalls.
        """
        if length > 0:
            self.h2_connection.acknowledge_received_data(length, stream_id)

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


_CLOSED_LOCALLY = (GRPCStreamState.HALF_CLOSED_LOCAL, GRPCStreamState.CLOSED)


class TidyStream(GRPCProtoStream):  # type: ignore[misc]  # purerpc is untyped
    """A purerpc stream whose event queue leaves nothing to close."""

    _incoming_events: Any

    def __init__(self, grpc_connection: Any, stream_id: int, socket: Any, grpc_socket: Any) -> None:
        # purerpc's GRPCStream.__init__, minus the anyio memory streams it
        # would make only for us to close them (a cost on every call).
        self._stream_id = stream_id
        self._grpc_connection = grpc_connection
        self._grpc_socket = grpc_socket
        self._socket = socket
        self._flow_control_update_event = anyio.Event()
        self._response_started = False
        self._state = GRPCStreamState.OPEN
        self._start_stream_event = None
        self._end_stream_event = None
        events = _Events()
        self._incoming_events = (_Inbox(self, events), events)
        #: Called (with no argument) when the peer resets this stream; the
        #: server points it at the call's cancel scope.
        self.on_reset: Callable[[], object] | None = None
        self.reset: StreamReset | None = None
        #: Client side: the server's trailers have arrived, so whatever we
        #: would still send has nowhere to go.
        self.answer_complete = False

    def answer_arrived(self) -> None:
        """The server's answer is complete (client side): stop sending."""
        self.answer_complete = True
        self._flow_control_update_event.set()  # a sender waiting for window gives up

    def was_reset(self, event: StreamReset) -> None:
        """The peer reset this stream: forget it, and tell whoever is running the call.

        A reset after a complete answer (NO_ERROR, as RFC 9113 §8.1 has servers
        end a call whose request they no longer need, or any other code) only
        stops the sending: the answer stands.
        """
        self._state = GRPCStreamState.CLOSED
        self._grpc_socket._streams.pop(self._stream_id, None)
        self._flow_control_update_event.set()  # a sender waiting for window gives up
        if self.answer_complete:
            return
        self.reset = event
        self._discard_queued()
        if self.on_reset is not None:
            self.on_reset()

    def _discard_queued(self) -> None:
        """Drop what is queued for this stream, handing its window back: nobody will read it."""
        while True:
            try:
                queued = self._incoming_events[1].receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(queued, MessageReceived):
                self._grpc_connection.give_back(self._stream_id, queued.flow_controlled_length)

    def abandon(self) -> None:
        """Reset this stream (RST_STREAM CANCEL) and forget it; nobody reads it any more.

        The caller flushes the socket. Received data nobody will read is handed
        back to the connection's window.
        """
        connection = self._grpc_connection
        self._grpc_socket._streams.pop(self._stream_id, None)
        connection.give_back(
            self._stream_id, _buffered(connection.message_read_buffers.pop(self._stream_id, None))
        )
        self._discard_queued()
        if self._state != GRPCStreamState.CLOSED:
            self._state = GRPCStreamState.CLOSED
            connection.h2_connection.reset_stream(self._stream_id, 8)  # CANCEL

    async def send_message(self, message: Any) -> None:
        self._raise_if_reset()
        if not self.client_side and not self._response_started:
            # Response headers go out with the first message, in one write.
            await self.start_response()
        # Through our _send (purerpc's send_message calls GRPCStream._send by
        # super(), skipping overrides).
        await self._send(message.SerializeToString())

    async def _send(self, message: bytes, compress: bool = False) -> None:
        # purerpc's, but a sender waiting for window gives up once the peer
        # has ended the call, instead of waiting for a window that never comes.
        connection = self._grpc_connection
        buffer = MessageWriteBuffer(
            connection.config.message_encoding, connection.config.max_message_length
        )
        buffer.write_message(message, compress)
        while buffer:
            self._raise_if_reset()
            if self.answer_complete:
                return  # the answer is in: the rest of the request is moot
            window = connection.flow_control_window(self._stream_id)
            if window <= 0:
                # Corked or not: the peer opens the window only once it has what we sent.
                self._socket.write_out()
                await self._wait_flow_control_update()
                continue
            connection.send_data(self._stream_id, buffer.data_to_send(min(window, len(buffer))))
            await self._socket.flush()

    async def close(self, *args: Any, **kwargs: Any) -> None:
        if self.reset is not None or self._state in _CLOSED_LOCALLY:
            return  # nothing left to close: the peer did, or we did
        await super().close(*args, **kwargs)

    @property
    def closed_locally(self) -> bool:
        """This side has ended its half of the call (or the peer reset it)."""
        return self.reset is not None or self._state in _CLOSED_LOCALLY

    def _raise_if_reset(self) -> None:
        if self.reset is None:
            return
        if self.client_side:
            raise RpcStatusError(
                StatusCode.UNAVAILABLE,
                f"the server reset the stream (HTTP/2 error {self.reset.error_code})",
            )
        raise RpcStatusError(StatusCode.CANCELLED, "the client cancelled the call")

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
        # purerpc's own, plus the MessageTooLarge event. An event already
        # queued is taken without a scheduler pass: a call's headers, message
        # and end usually arrive in one read, and each pass cost more than the
        # rest of reading them. Bounded: the queue holds at most what the
        # flow-control window let the peer send.
        events = self._incoming_events[1]
        try:
            event = events.receive_nowait()
        except trio.WouldBlock:
            event = await events.receive()
        if isinstance(event, MessageTooLarge):
            raise RpcStatusError(StatusCode.RESOURCE_EXHAUSTED, event.message)
        if isinstance(event, StreamReset):
            self._raise_if_reset()
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


class _Writer(SocketWrapper):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's socket wrapper, writing from the task that has something to send.

    purerpc hands every write to its writer task (`flush` wakes it), so each
    message cost a task switch, and a scheduler pass, before its bytes left.
    Here `flush` writes at once when the socket takes it all; only what the
    socket would not take (and anything sent while such bytes wait) is left to
    the writer task, so the bytes keep their order. Inside `corked` nothing is
    written until the block ends, so the frames of one message (headers,
    data, end of stream) leave in one write. TLS streams always go through the
    writer task (a write must pass through the TLS object).
    """

    def __init__(self, connection: Any, stream: Any) -> None:
        super().__init__(connection, stream)
        self._raw = (
            None
            if isinstance(stream, TLSStream)
            else stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        )
        self._flush_event: Any = self._flush_event  # set by purerpc, untyped
        #: Bytes taken from h2 and not yet written; only the writer task writes them.
        self._pending = b""
        #: The task inside `corked` (its other tasks' writes are not held), and how deep.
        self._corked_by: trio.lowlevel.Task | None = None
        self._corked = 0
        #: The connection's open streams (its socket's ``_streams``), set by `TidySocket`.
        self.streams: dict[int, Any] = {}

    async def _writer_thread(self) -> None:
        while True:
            if not self._pending:
                self._pending = self._grpc_connection.data_to_send()
            if self._pending:
                await self._stream.send(self._pending)
                self._pending = b""
            elif self._running:
                await self._flush_event.wait()
                self._flush_event = anyio.Event()
            else:
                return

    async def flush(self) -> None:
        if not self._corked or self._corked_by is not trio.lowlevel.current_task():
            self.write_out()

    def write_out(self) -> None:
        """Write what h2 has for the peer now (corked or not), or leave it to the writer task.

        With several calls open on the connection the writer task writes: it
        runs once the tasks ready now have run, so their messages share one
        write (a write costs more than a task switch).
        """
        if self._raw is not None and not self._pending and len(self.streams) < 2:
            data = self._grpc_connection.data_to_send()
            if not data:
                return
            try:
                sent = self._raw.send(data)
            except OSError:  # full (BlockingIOError), or broken: the writer task's send says so
                sent = 0
            if sent == len(data):
                return
            self._pending = data[sent:]
        self._flush_event.set()

    def corked(self) -> _Cork:
        """Hold this task's writes in the block and send them together when it ends
        (however it ends). Other tasks' writes are not held; a corked sender that
        must wait for window writes first."""
        return _Cork(self)


class _Cork:
    """`_Writer.corked`'s block (a class: a generator context manager cost more per call)."""

    __slots__ = ("_held", "_writer")

    def __init__(self, writer: _Writer) -> None:
        self._writer = writer
        self._held = False

    def __enter__(self) -> None:
        writer = self._writer
        task = trio.lowlevel.current_task()
        if writer._corked and writer._corked_by is not task:
            return  # another task's block: ours would hold its writes too
        writer._corked_by = task
        writer._corked += 1
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        if not self._held:
            return
        writer = self._writer
        writer._corked -= 1
        if not writer._corked:
            writer._corked_by = None
            writer.write_out()


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
        self._grpc_connection.streams = self._streams
        self._socket = _Writer(self._grpc_connection, sock)
        self._socket.streams = self._streams

    async def _reader_thread(self) -> None:
        await super()._reader_thread()
        raise ConnectionResetError("the server closed the connection")


def client_config(max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH) -> Any:
    """A fresh client-side purerpc configuration."""
    return GRPCConfiguration(client_side=True, max_message_length=max_message_length)


def server_config(max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH) -> Any:
    """A fresh server-side purerpc configuration."""
    return GRPCConfiguration(client_side=False, max_message_length=max_message_length)
