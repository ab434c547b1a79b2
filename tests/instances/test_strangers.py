"""A stranger on an instance's port never counts as the instance (issue 11, item 4).

Real strangers: a plain listening socket, and a gRPC health server answering
SERVING, each bound to the port the instance was given before the instance's
own process (the TEI test double, told to take its time) binds it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import trio

from teisup.instances import (
    Desired,
    ExitCause,
    InstanceManager,
    InstanceSpec,
    PortOwner,
    RestartPolicy,
)
from teisup.proto.grpc.health.v1 import health_pb2
from teisup.rpc import fetch_info
from teisup.supervision import Backoff, ChildState, TransitionEvent

from ..supervision.helpers import wait_for
from .conftest import running_manager

MODEL = "BAAI/bge-small-en-v1.5"
QUICK = RestartPolicy(backoff=Backoff(initial=0.05, maximum=0.1))
#: Long enough for the stranger to bind first.
SLOW_START = {"FAKE_TEI_START_DELAY": "1.5"}


def spec(**kwargs: object) -> InstanceSpec:
    kwargs.setdefault("restart", QUICK)
    return InstanceSpec(name="bge-small", model_id=MODEL, **kwargs)  # type: ignore[arg-type]


@contextmanager
def plain_listener(port: int) -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock


@contextmanager
def grpc_health_server(port: int) -> Iterator[grpc.Server]:
    """grpcio's server answering ``grpc.health.v1.Health/Check`` with SERVING."""

    def check(request: health_pb2.HealthCheckRequest, context: object) -> object:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers((handler,))
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=None).wait()


async def first_running(
    events: trio.MemoryReceiveChannel[TransitionEvent], manager: InstanceManager
) -> tuple[int, list[TransitionEvent]]:
    """The port the instance is on when it first shows running, and what came before."""
    seen: list[TransitionEvent] = []
    await wait_for(events, "bge-small", ChildState.RUNNING, seen)
    return manager.get("bge-small").port, seen


async def assert_serves_on_a_fresh_port(
    manager: InstanceManager, events: trio.MemoryReceiveChannel[TransitionEvent], taken: int
) -> None:
    port, seen = await first_running(events, manager)
    assert port != taken
    assert port in manager.ports.instance_ports
    # Running means the instance's own process answers there.
    assert (await fetch_info("127.0.0.1", port, timeout=5)).model_id == MODEL
    backoff = next(e for e in seen if e.new is ChildState.BACKOFF)
    assert backoff.old is ChildState.STARTING  # never shown running on the taken port
    assert f"port {taken} is held by another process" in backoff.reason
    assert f"the next run gets port {port}" in backoff.reason
    info = manager.get("bge-small")
    assert (info.port, info.restarts, info.desired) == (port, 1, Desired.RUNNING)
    cause = manager.last_exit_cause("bge-small")
    assert cause is not None
    assert (cause.cause, cause.port) == (ExitCause.PORT_TAKEN, taken)


async def test_a_plain_socket_on_the_port_moves_the_instance_to_a_fresh_one(
    tmp_path: Path,
) -> None:
    with trio.fail_after(40):
        async with running_manager(tmp_path, env=SLOW_START) as manager:
            with manager.supervisor.events.subscribe() as events:
                taken = (await manager.create(spec())).port
                with plain_listener(taken):
                    await assert_serves_on_a_fresh_port(manager, events, taken)


async def test_a_grpc_server_answering_serving_on_the_port_is_not_the_instance(
    tmp_path: Path,
) -> None:
    with trio.fail_after(40):
        async with running_manager(tmp_path, env=SLOW_START) as manager:
            with manager.supervisor.events.subscribe() as events:
                taken = (await manager.create(spec())).port
                with grpc_health_server(taken):
                    await assert_serves_on_a_fresh_port(manager, events, taken)


async def test_a_port_the_user_set_is_kept_and_the_error_names_it(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        pinned = probe.getsockname()[1]
    once = RestartPolicy(max_restarts=1, backoff=Backoff(initial=0.05, maximum=0.1))
    with trio.fail_after(40):
        async with running_manager(tmp_path, env=SLOW_START) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(port=pinned, restart=once))
                with grpc_health_server(pinned):
                    seen: list[TransitionEvent] = []
                    failed = await wait_for(events, "bge-small", ChildState.FAILED, seen)
            assert ChildState.RUNNING not in [e.new for e in seen]
            assert f"port {pinned} is held by another process" in failed.reason
            assert f"port {pinned} was set for this instance, so it is kept" in failed.reason
            info = manager.get("bge-small")
            assert (info.port, info.status) == (pinned, ChildState.FAILED)
            assert info.last_exit is not None
            assert f"port {pinned}" in info.last_exit.detail


async def test_where_sockets_cannot_be_read_a_bind_failure_still_moves_the_port(
    tmp_path: Path,
) -> None:
    # No /proc to ask (the seam says so): the stranger is not seen, the
    # instance's process fails to bind ("Address already in use") and that
    # exit moves it to a fresh port.
    with trio.fail_after(40):
        async with running_manager(
            tmp_path, env=SLOW_START, port_owner=lambda port, pid: PortOwner.UNKNOWN
        ) as manager:
            with manager.supervisor.events.subscribe() as events:
                taken = (await manager.create(spec())).port
                with plain_listener(taken):
                    port, seen = await first_running(events, manager)
            assert port != taken
            backoff = next(e for e in seen if e.new is ChildState.BACKOFF)
            assert f"port {taken} is taken by another process" in backoff.reason
            assert "Address already in use" in backoff.reason  # its own words


async def test_where_sockets_cannot_be_read_the_served_model_must_match(
    tmp_path: Path,
) -> None:
    # A health server alone proves nothing: with no /proc, readiness needs
    # tei.v1.Info to name the instance's model, which the stranger cannot.
    with trio.fail_after(40):
        async with running_manager(
            tmp_path, env=SLOW_START, port_owner=lambda port, pid: PortOwner.UNKNOWN
        ) as manager:
            with manager.supervisor.events.subscribe() as events:
                taken = (await manager.create(spec())).port
                with grpc_health_server(taken):
                    port, seen = await first_running(events, manager)
            assert port != taken
            assert (await fetch_info("127.0.0.1", port, timeout=5)).model_id == MODEL
            backoff = next(e for e in seen if e.new is ChildState.BACKOFF)
            assert backoff.old is ChildState.STARTING


async def test_a_restored_port_that_is_taken_is_replaced_unless_the_user_set_it(
    tmp_path: Path,
) -> None:
    async with running_manager(tmp_path) as manager:
        first = manager.ports.instance_ports.first
        with plain_listener(first), plain_listener(first + 1):
            auto = InstanceSpec(name="auto", model_id=MODEL)
            manager.register(
                auto,
                port=first,
                prometheus_port=manager.ports.prometheus_ports.first,
                created_at=None,
                desired=Desired.RUNNING,
            )
            pinned = InstanceSpec(name="pinned", model_id=MODEL, port=first + 1)
            manager.register(
                pinned,
                port=first + 1,
                prometheus_port=manager.ports.prometheus_ports.first + 1,
                created_at=None,
                desired=Desired.STOPPED,
            )
            moved = manager.get("auto")
            assert moved.port not in (first, first + 1)
            assert moved.port in manager.ports.instance_ports
            assert moved.prometheus_port == manager.ports.prometheus_ports.first
            assert manager.get("pinned").port == first + 1
