#!/usr/bin/env python3
"""The first burst through the multiplexer against later bursts, and against the instance itself.

    python benchmarks/first_burst.py [--clients 500] [--calls 20] [--deadline 5]
                                     [--backend tiny|embedded] [--bursts 2]

Issue 11 item 10: "500 concurrent grpcio clients x 20 Embed calls right after
start: p99 12-16 s, max 15-21 s through the multiplexer, 0.3 s straight to the
instance; later bursts p99 ~1.5 s; with a 5 s client deadline 230 of 10,000
calls fail in the first burst, none later."

It starts a backend (``tiny``: a ``tei.v1`` Embed server in a process of its
own that answers at once with a fixed vector, so the figures are the
transport's; ``embedded``: ``python -m teisup.embedded`` with all-MiniLM-L6-v2)
and a `teisup.grpc.Multiplexer` in another process
(``benchmarks/mux_overhead.py --serve-mux``) whose only instance is that
backend. Then ``--clients`` grpc.aio clients in this process, each making
``--calls`` unary Embed calls one after another under a ``--deadline``:

1. straight to the backend, on fresh channels, then ``--bursts - 1`` more times
   on the same channels;
2. through the multiplexer, right after it started (its first call to the
   instance opens its backend connection), then again.

Each line gives the wall time, p50 / p99 / max latency, the calls past the
deadline, and the multiplexer's CPU time per call. With the pool's lock
convoy (fixed), the multiplexer's first burst showed a tail the later ones
did not: e.g. p99 27 s against 8 s, 500 clients x 5 calls, 60 s deadline, on a
busy 2-core machine; p99 5.3 s against 7 s with the fix.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import MODEL, free_port, sentences  # noqa: E402
from benchmarks.mux_overhead import Child, cpu_seconds  # noqa: E402

INSTANCE = "minilm"


def serve_tiny() -> int:
    """A ``tei.v1`` Embed server that answers at once, until stdin closes."""
    import trio

    from teisup.proto.tei.v1 import tei_grpc, tei_pb2
    from teisup.rpc import Server

    vector = [0.5] * 384

    class Embed(tei_grpc.EmbedServicer):  # type: ignore[misc]
        async def Embed(self, input_message: Any) -> Any:
            return tei_pb2.EmbedResponse(embeddings=vector)

    async def run() -> None:
        server = Server(0, host="127.0.0.1")
        server.add_service(Embed())
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve_async)
            print(f"listening {port}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


async def burst(
    args: argparse.Namespace, channels: list[Any], *, mux: bool, label: str, mux_pid: int
) -> None:
    from teisup.proto.tei.v1 import tei_pb2
    from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2

    texts = sentences(args.clients * args.calls)
    target = mux_pb2.Target(instance_name=INSTANCE)
    latencies: list[float] = []
    failed: dict[str, int] = {}

    async def client(k: int) -> None:
        channel = channels[k % len(channels)]
        if mux:
            method = "/tei_multiplexer.v1.TeiMultiplexer/Embed"
            serializer = mux_pb2.EmbedRequest.SerializeToString
        else:
            method = "/tei.v1.Embed/Embed"
            serializer = tei_pb2.EmbedRequest.SerializeToString
        embed = channel.unary_unary(
            method,
            request_serializer=serializer,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        import grpc  # type: ignore[import-untyped,unused-ignore]

        for j in range(args.calls):
            request: Any = tei_pb2.EmbedRequest(inputs=texts[k * args.calls + j])
            if mux:
                request = mux_pb2.EmbedRequest(target=target, request=request)
            sent = time.perf_counter()
            try:
                await embed(request, timeout=args.deadline)
            except grpc.aio.AioRpcError as exc:
                failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
            latencies.append(time.perf_counter() - sent)

    cpu = cpu_seconds(mux_pid)
    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(args.clients)))
    wall = time.perf_counter() - start
    cpu_us = (cpu_seconds(mux_pid) - cpu) / len(latencies) * 1e6 if mux else 0.0
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    failures = ", ".join(f"{n} {code}" for code, n in failed.items()) or "none"
    mux_cpu = f"{cpu_us:6.0f}" if mux else f"{'-':>6}"
    print(
        f"{label:<24} {wall:7.2f} {q(0.5):7.3f} {q(0.99):7.3f} {latencies[-1]:7.3f} "
        f"{mux_cpu}   {failures}",
        flush=True,
    )


async def measure(args: argparse.Namespace, backend_port: int, mux_port: int, mux_pid: int) -> None:
    import grpc

    def open_channels(port: int) -> list[Any]:
        # One connection per process and target, as grpcio does by default
        # (its global subchannel pool), unless --connections asks for more.
        options = [("grpc.use_local_subchannel_pool", 1)] if args.connections > 1 else []
        return [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
            for _ in range(args.connections)
        ]

    print(f"{'':<24} {'wall':>7} {'p50':>7} {'p99':>7} {'max':>7} {'mux CPU':>6}   past deadline")
    print(f"{'':<24} {'s':>7} {'s':>7} {'s':>7} {'s':>7} {'us/call':>6}")
    direct = open_channels(backend_port)
    via_mux = open_channels(mux_port)
    try:
        for n in range(args.bursts):
            label = "direct, first burst" if n == 0 else f"direct, burst {n + 1}"
            await burst(args, direct, mux=False, label=label, mux_pid=mux_pid)
        for n in range(args.bursts):
            label = "mux, first burst" if n == 0 else f"mux, burst {n + 1}"
            await burst(args, via_mux, mux=True, label=label, mux_pid=mux_pid)
    finally:
        for channel in direct + via_mux:
            await channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500, help="concurrent clients")
    parser.add_argument("--calls", type=int, default=20, help="calls per client and burst")
    parser.add_argument("--deadline", type=float, default=5.0, help="client deadline, seconds")
    parser.add_argument("--bursts", type=int, default=2, help="bursts per side")
    parser.add_argument("--connections", type=int, default=1, help="client connections per side")
    parser.add_argument("--backend", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--serve-tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_tiny:
        return serve_tiny()

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    children: list[Child] = []
    try:
        if args.backend == "tiny":
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-tiny"]
            backend = Child("backend", argv, stdin=subprocess.PIPE)
            children.append(backend)
            line = backend.wait_for(lambda line: line.startswith("listening "))
            backend_port = int(line.split()[1])
        else:
            backend_port = free_port()
            argv = [sys.executable, "-m", "teisup.embedded", "--model-id", MODEL]
            argv += ["--hostname", "127.0.0.1", "--port", str(backend_port)]
            argv += ["--prometheus-port", str(free_port()), "--max-concurrent-requests", "1024"]
            backend = Child("backend", argv)
            children.append(backend)
            backend.wait_for(lambda line: line.endswith("Ready"))
        argv = [sys.executable, str(ROOT / "benchmarks" / "mux_overhead.py"), "--serve-mux"]
        argv += [str(backend_port), str(backend.proc.pid), str(free_port())]
        mux = Child("multiplexer", argv, stdin=subprocess.PIPE)
        children.append(mux)
        mux_port = int(mux.wait_for(lambda line: line.startswith("listening ")).split()[1])
        print(
            f"{args.backend} backend on port {backend_port}, multiplexer pid {mux.proc.pid}; "
            f"{args.clients} clients x {args.calls} calls, {args.deadline:g} s deadline, "
            f"{args.connections} connection(s); {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        asyncio.run(measure(args, backend_port, mux_port, mux.proc.pid))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for child in reversed(children):
            child.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
