"""The multiplexer against TEI test doubles: routing errors, deadlines, dead backends, limits.

Backends here are ``tests/fake_tei.py`` processes (Info and health only), so
these tests need no model and take seconds.
"""

from __future__ import annotations

import datetime
import errno
import json
import sys
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
import trio

from teisup.grpc import SERVICE_NAME, Multiplexer
from teisup.proto.tei.v1 import tei_pb2
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux
from teisup.rpc import RpcStatusError, ServingStatus, check_health, fetch_info, open_channel
from teisup.supervision import ChildSpec, ChildState, Supervisor

from .conftest import Instances, Record, call, running_mux, target


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


async def expect_status(mux_: Multiplexer, fn: Any, code: str, *, bound: float = 30) -> str:
    with pytest.raises(RpcStatusError) as caught:
        await call(mux_, fn, timeout=bound)
    assert caught.value.code_name == code, caught.value
    return caught.value.details


async def test_info_is_the_instances_own(fake_backend: Any) -> None:
    backend = fake_backend(model_id="org/fake")
    instances = Instances(backend.record("fake", model_id="org/fake"))
    async with running_mux(instances) as m:
        direct = await fetch_info("127.0.0.1", backend.port, timeout=10)
        by_name = await call(m, lambda s: s.Info(mux.InfoRequest(target=target("fake"))))
        by_model = await call(
            m, lambda s: s.Info(mux.InfoRequest(target=mux.Target(model_id="org/fake")))
        )
        by_index = await call(
            m, lambda s: s.Info(mux.InfoRequest(target=mux.Target(instance_index=0)))
        )
        assert by_name == by_model == by_index == direct
        assert direct.model_id == "org/fake"
        # Four calls, one long-lived connection.
        assert m.pool.connects == 1


async def test_routing_errors_are_statuses(fake_backend: Any) -> None:
    backend = fake_backend()
    instances = Instances(
        backend.record("ok"),
        Record("booting", status=ChildState.STARTING, port=1),
        Record("dead", status=ChildState.FAILED),
    )
    async with running_mux(instances) as m:

        def info(t: mux.Target | None) -> Any:
            return lambda s: s.Info(mux.InfoRequest(target=t))

        assert await expect_status(m, info(None), "INVALID_ARGUMENT") == "Missing target"
        assert await expect_status(m, info(mux.Target()), "INVALID_ARGUMENT") == (
            "No routing specified"
        )
        assert await expect_status(m, info(target("nope")), "NOT_FOUND") == (
            "Instance 'nope' not found"
        )
        assert await expect_status(m, info(target("booting")), "UNAVAILABLE") == (
            "Instance 'booting' is not running (status: starting)"
        )
        details = await expect_status(m, info(mux.Target(instance_index=7)), "NOT_FOUND")
        assert details == "Instance index 7 out of range (3 instances)"
        # The server keeps serving after every refusal.
        assert (await call(m, info(target("ok")))).model_id == "test/model"


async def test_missing_inner_request_and_empty_stream() -> None:
    instances = Instances(Record("a"))
    async with running_mux(instances) as m:
        details = await expect_status(
            m, lambda s: s.Embed(mux.EmbedRequest(target=target("a"))), "INVALID_ARGUMENT"
        )
        assert details == "Missing embed request"

        async def empty_stream(s: Any) -> Any:
            stream = await s.EmbedStream()
            await stream.close()
            assert await stream.receive_message() is None
            return stream.end_stream_event.status

        status = await call(m, empty_stream)
        assert (status.status_code.name, status.status_message) == (
            "INVALID_ARGUMENT",
            "Empty stream",
        )


async def test_arrow_input_errors_and_noop() -> None:
    # noop needs a well-formed target but no instance at all.
    async with running_mux(Instances()) as m:

        def arrow(data: bytes, *, noop: bool = True, sparse: bool = False) -> Any:
            if sparse:
                return lambda s: s.EmbedSparseArrow(
                    mux.EmbedSparseArrowRequest(target=target("x"), arrow_ipc=data, noop=noop)
                )
            return lambda s: s.EmbedArrow(
                mux.EmbedArrowRequest(target=target("x"), arrow_ipc=data, noop=noop)
            )

        texts = ipc(pa.table({"text": ["a", "b", "c"]}))
        dense = await call(m, arrow(texts))
        table = pa.ipc.open_stream(dense.arrow_ipc).read_all()
        assert table.num_rows == 3
        assert table.schema.field(0).type == pa.list_(pa.field("item", pa.float32(), False), 384)
        sparse = await call(m, arrow(texts, sparse=True))
        rows = pa.ipc.open_stream(sparse.arrow_ipc).read_all().column(0).to_pylist()
        assert rows[2] == [
            {"index": 2, "value": 1.0},
            {"index": 102, "value": 0.5},
            {"index": 202, "value": 0.25},
        ]

        details = await expect_status(m, arrow(b"not arrow"), "INVALID_ARGUMENT")
        assert details.startswith("Invalid Arrow IPC: ")
        details = await expect_status(m, arrow(ipc(pa.table({"n": [1]}))), "INVALID_ARGUMENT")
        assert details.startswith("First column must be a string column")
        empty = ipc(pa.table({"text": pa.array([], pa.string())}))
        assert await expect_status(m, arrow(empty), "INVALID_ARGUMENT") in (
            "No RecordBatch in stream",
            "Arrow input has no rows",
        )
        nulls = ipc(pa.table({"text": ["a", None]}))
        details = await expect_status(m, arrow(nulls, sparse=True), "INVALID_ARGUMENT")
        assert details == "Row 1 of column 'text' is null"
        # Not noop: the instance must exist.
        assert await expect_status(m, arrow(texts, noop=False), "NOT_FOUND") == (
            "Instance 'x' not found"
        )


async def test_backend_killed_mid_call_is_unavailable_at_once(fake_backend: Any) -> None:
    backend = fake_backend(env={"FAKE_TEI_HANG": "0"})  # every call waits forever
    instances = Instances(backend.record("hung"))
    async with running_mux(instances, default_timeout=60) as m:
        async with trio.open_nursery() as nursery:
            outcome: dict[str, Any] = {}

            async def ask() -> None:
                with pytest.raises(RpcStatusError) as caught:
                    await call(m, lambda s: s.Info(mux.InfoRequest(target=target("hung"))))
                outcome["error"] = caught.value
                outcome["at"] = trio.current_time()

            nursery.start_soon(ask)
            # The call is running on the backend's connection (which never answers).
            await m.pool.wait_active("hung")
            killed_at = trio.current_time()
            backend.kill()
        error = outcome["error"]
        assert error.code_name == "UNAVAILABLE"
        assert "Instance 'hung'" in error.details
        assert "connection lost" in error.details
        assert outcome["at"] - killed_at < 5  # not the 60 s default deadline
        # The dead connection is gone; the next call connects anew and fails fast.
        await expect_status(
            m, lambda s: s.Info(mux.InfoRequest(target=target("hung"))), "UNAVAILABLE", bound=10
        )


async def test_silent_backend_hits_the_default_deadline(fake_backend: Any) -> None:
    backend = fake_backend(env={"FAKE_TEI_HANG": "0"})
    async with running_mux(Instances(backend.record("hung")), default_timeout=0.5) as m:
        started = trio.current_time()
        details = await expect_status(
            m, lambda s: s.Info(mux.InfoRequest(target=target("hung"))), "DEADLINE_EXCEEDED"
        )
        assert details == "Request timeout"
        assert trio.current_time() - started < 5


async def test_in_flight_limit_gives_resource_exhausted(fake_backend: Any) -> None:
    backend = fake_backend(env={"FAKE_TEI_HANG": "0"})
    record = backend.record("one", spec=SimpleNamespace(max_concurrent_requests=1))
    async with (
        running_mux(Instances(record), default_timeout=30, queue_timeout=0.2) as m,
        trio.open_nursery() as nursery,
    ):

        async def hold_the_slot() -> None:
            with pytest.raises(RpcStatusError):
                await call(m, lambda s: s.Info(mux.InfoRequest(target=target("one"))))

        nursery.start_soon(hold_the_slot)
        await m.pool.wait_active("one")
        details = await expect_status(
            m, lambda s: s.Info(mux.InfoRequest(target=target("one"))), "RESOURCE_EXHAUSTED"
        )
        assert "1 requests in flight" in details
        backend.kill()  # releases the first call (UNAVAILABLE)


async def test_no_queueing_at_all_still_serves_free_slots(fake_backend: Any) -> None:
    backend = fake_backend()
    record = backend.record("one", spec=SimpleNamespace(max_concurrent_requests=1))
    async with running_mux(Instances(record), queue_timeout=0) as m:
        for _ in range(2):  # the slot is taken and given back each time
            info = await call(m, lambda s: s.Info(mux.InfoRequest(target=target("one"))))
            assert info.version == "1.9.3"


async def test_restarted_instance_gets_a_new_connection(fake_backend: Any) -> None:
    first = fake_backend()
    instances = Instances(first.record("x"))
    async with running_mux(instances) as m:
        request = mux.InfoRequest(target=target("x"))
        await call(m, lambda s: s.Info(request))
        second = fake_backend(model_id="org/second")
        instances.set(second.record("x", model_id="org/second"))  # new pid and port
        info = await call(m, lambda s: s.Info(request))
        assert info.model_id == "org/second"
        assert m.pool.connects == 2


async def test_health_per_instance_and_taken_port(fake_backend: Any) -> None:
    instances = Instances(Record("up"), Record("down", status=ChildState.BACKOFF))
    async with running_mux(instances) as m:
        port = m.port

        async def health(service: str) -> ServingStatus:
            return await check_health("127.0.0.1", port, service=service, timeout=10)

        assert await health("") is ServingStatus.SERVING
        assert await health(SERVICE_NAME) is ServingStatus.SERVING
        assert await health("up") is ServingStatus.SERVING
        assert await health("down") is ServingStatus.NOT_SERVING
        assert await health("unknown") is ServingStatus.SERVICE_UNKNOWN
        instances.update("down", status=ChildState.RUNNING)
        m.refresh_health()
        assert await health("down") is ServingStatus.SERVING

        second = Multiplexer(instances, port=port)
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError, match="in use") as caught:
                await nursery.start(second.serve)
        assert caught.value.errno == errno.EADDRINUSE


async def test_runs_as_a_supervised_child() -> None:
    mux_ = Multiplexer(Instances(Record("a")), port=0)
    root = Supervisor("root", [ChildSpec("grpc", mux_.run)])
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        assert root.which_children()[0].state is ChildState.RUNNING
        assert await check_health("127.0.0.1", mux_.port, timeout=10) is ServingStatus.SERVING
        await root.stop()
    # Stopped: the port is closed.
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream("127.0.0.1", mux_.port)


async def test_unary_deadline_from_the_client_is_enforced(fake_backend: Any) -> None:
    backend = fake_backend(env={"FAKE_TEI_HANG": "0"})
    # No default deadline: only the client's 0.3 s bounds the call.
    async with (
        running_mux(Instances(backend.record("hung")), default_timeout=0) as m,
        open_channel("127.0.0.1", m.port) as channel,
    ):
        stream = await channel._grpc_socket.start_request(
            "http",
            SERVICE_NAME,
            "Info",
            "tei_multiplexer.v1.InfoRequest",
            "127.0.0.1",
            timeout=datetime.timedelta(seconds=0.3),
        )
        stream.expect_message_type(tei_pb2.InfoResponse)
        await stream.send_message(mux.InfoRequest(target=target("hung")))
        await stream.close()
        with trio.fail_after(10):
            assert await stream.receive_message() is None
        assert stream.end_stream_event.status.status_code.name == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_lists_and_describes_the_services(version: str) -> None:
    import importlib

    from google.protobuf import descriptor_pb2

    package = f"teisup.proto.grpc.reflection.{version}"
    reflection_grpc = importlib.import_module(f"{package}.reflection_grpc")
    reflection_pb2 = importlib.import_module(f"{package}.reflection_pb2")

    async with running_mux(Instances()) as m:
        with trio.fail_after(30):
            async with open_channel("127.0.0.1", m.port) as channel:
                stream = await reflection_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
                answers = []
                for request in (
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
                ):
                    await stream.send_message(request)
                    answers.append(await stream.receive_message())
                await stream.close()
        listed, described = answers
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "tei.v1.Embed", "grpc.health.v1.Health"} <= names
    assert {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    } <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert [f.name for f in files] == ["tei_multiplexer/v1/multiplexer.proto", "tei/v1/tei.proto"]
    methods = {m.name for m in files[0].service[0].method}
    assert {"Embed", "EmbedStream", "EmbedArrow", "EmbedSparseArrow", "DecodeStream"} <= methods
    assert len(methods) == 19


GRPCIO_REFLECTION_CLIENT = """
import json, sys
import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
with grpc.insecure_channel("127.0.0.1:" + sys.argv[1]) as channel:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = list(database.get_services())
    service = DescriptorPool(database).FindServiceByName(sys.argv[2])
    print(json.dumps([services, [m.name for m in service.methods]]))
"""


async def test_grpcio_reflection_client_resolves_the_service() -> None:
    # In its own process: grpcio-reflection registers the reflection proto in
    # protobuf's default pool, as teisup's own stubs do in this one.
    async with running_mux(Instances()) as m:
        result = await trio.run_process(
            [sys.executable, "-c", GRPCIO_REFLECTION_CLIENT, str(m.port), SERVICE_NAME],
            capture_stdout=True,
            capture_stderr=True,
        )
    services, methods = json.loads(result.stdout)
    assert SERVICE_NAME in services
    assert "EmbedArrow" in methods


def _grpcio_over_size(port: int, stubs: SimpleNamespace) -> tuple[Any, Any]:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = stubs.pb2_grpc.TeiMultiplexerStub(channel)

        def embed(text: str) -> Any:
            request = stubs.pb2.EmbedRequest(
                target=stubs.pb2.Target(instance_name="x"),
                request=stubs.tei_pb2.EmbedRequest(inputs=text),
            )
            try:
                return stub.Embed(request, timeout=30)
            except grpc.RpcError as error:
                return error

        return embed("w " * (1 << 20)), embed("small")


async def test_an_over_size_message_is_refused_and_the_connection_keeps_serving(
    mux_stubs: SimpleNamespace,
) -> None:
    async with running_mux(Instances(), max_message_length=1 << 20) as m:
        huge, small = await trio.to_thread.run_sync(_grpcio_over_size, m.port, mux_stubs)
    assert huge.code().name == "RESOURCE_EXHAUSTED"
    assert huge.details() == "Received message larger than max: 2097167 > 1048576"
    # The same channel, the next call: routed (and refused) as usual.
    assert (small.code().name, small.details()) == ("NOT_FOUND", "Instance 'x' not found")


def test_the_message_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="max_message_length"):
        Multiplexer(Instances(), max_message_length=1 << 30)


async def test_a_client_that_cancels_frees_the_backend_at_once(
    fake_backend: Any, mux_stubs: SimpleNamespace
) -> None:
    """grpcio cancels (RST_STREAM, no deadline sent): the backend call ends with it."""
    import grpc

    backend = fake_backend(env={"FAKE_TEI_HANG": "0"})  # every call waits forever
    async with running_mux(Instances(backend.record("hung")), default_timeout=600) as m:
        with grpc.insecure_channel(f"127.0.0.1:{m.port}") as channel:
            stub = mux_stubs.pb2_grpc.TeiMultiplexerStub(channel)
            request = mux_stubs.pb2.InfoRequest(target=mux_stubs.pb2.Target(instance_name="hung"))
            future = stub.Info.future(request)
            with trio.fail_after(30):
                await m.pool.wait_active("hung")
            assert m.pool.in_flight("hung") == 1
            future.cancel()
            with trio.fail_after(10):  # not the 600 s default deadline
                await m.pool.wait_idle("hung")
            assert m.pool.in_flight("hung") == 0
            # The connection to the backend stays usable for the next calls.
            assert m.pool.connects == 1
