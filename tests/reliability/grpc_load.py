"""Many grpcio clients at once against the multiplexer: who got which answer, in what order.

The clients are grpcio's asyncio API (``grpc.aio``), the client nobody on this
team wrote, run in a worker thread with its own event loop so a Trio test can
drive the manager meanwhile. Each client makes its calls one after another;
every answer (or error) is recorded with its place in the order answers
arrived, so a test can check fairness as well as failures.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import trio

MUX = "/tei_multiplexer.v1.TeiMultiplexer"


@dataclass(frozen=True)
class Answer:
    """One call's outcome."""

    client: int
    call: int
    #: Its place among all answers, in arrival order (0 first).
    order: int
    #: "OK" or the gRPC status code's name.
    code: str
    seconds: float
    model_id: str = ""


@dataclass
class Run:
    """What `run_clients` saw."""

    answers: list[Answer]
    seconds: float

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.code != "OK"]

    def latency(self, q: float) -> float:
        ordered = sorted(a.seconds for a in self.answers)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _clients(
    stubs: SimpleNamespace,
    port: int,
    clients: int,
    calls: int,
    target: Callable[[int], Any],
    deadline: float,
    connections: int,
    started: Callable[[], None],
) -> Run:
    import grpc  # type: ignore[import-untyped,unused-ignore]

    # grpcio shares one connection among every channel of a process to the
    # same target (its global subchannel pool); a local pool per channel
    # gives each its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(connections)
    ]
    answers: list[Answer] = []
    try:
        info = [
            channel.unary_unary(
                f"{MUX}/Info",
                request_serializer=stubs.pb2.InfoRequest.SerializeToString,
                response_deserializer=stubs.tei_pb2.InfoResponse.FromString,
            )
            for channel in channels
        ]

        async def client(k: int) -> None:
            call_info = info[k % connections]
            for j in range(calls):
                request = stubs.pb2.InfoRequest(target=target(k))
                sent = time.perf_counter()
                try:
                    reply = await call_info(request, timeout=deadline)
                except grpc.aio.AioRpcError as exc:
                    code, model = exc.code().name, ""
                else:
                    code, model = "OK", reply.model_id
                elapsed = time.perf_counter() - sent
                answers.append(Answer(k, j, len(answers), code, elapsed, model))

        start = time.perf_counter()
        started()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return Run(answers, time.perf_counter() - start)
    finally:
        for channel in channels:
            await channel.close()


async def run_clients(
    stubs: SimpleNamespace,
    port: int,
    *,
    clients: int,
    calls: int,
    target: Callable[[int], Any],
    deadline: float,
    connections: int = 1,
    started: trio.Event | None = None,
) -> Run:
    """``clients`` concurrent grpcio clients, ``calls`` Info calls each, through the multiplexer.

    ``target(k)`` is client k's ``Target``; each call has ``deadline`` seconds.
    The clients share ``connections`` HTTP/2 connections (client k uses
    connection ``k % connections``). ``started`` is set when the calls begin.
    """
    token = trio.lowlevel.current_trio_token()

    def mark() -> None:
        if started is not None:
            token.run_sync_soon(started.set)

    job = _clients(stubs, port, clients, calls, target, deadline, connections, mark)
    result: Run = await trio.to_thread.run_sync(functools.partial(asyncio.run, job))
    return result
