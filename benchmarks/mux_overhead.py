#!/usr/bin/env python3
"""The multiplexer's hop: the same calls straight to a backend and through the multiplexer.

    python benchmarks/mux_overhead.py [--seconds 5] [--concurrency 1,32] [--arrow-batch 1000]

Starts one ``python -m teisup.embedded`` with all-MiniLM-L6-v2 (the packaged
weights) and, in a process of its own (this script with a hidden
``--serve-mux`` flag), a `teisup.grpc.Multiplexer` whose only instance,
``minilm``, is that very backend. A grpcio (``grpc.aio``) client in this
process then reports, side by side:

* unary Embed, one short sentence per call, at each ``--concurrency`` (callers
  in flight at once): texts/s, p50 and p99 latency, ``tei.v1.Embed/Embed`` on
  the backend against ``TeiMultiplexer/Embed`` targeting ``minilm``;
* Arrow: ``EmbedArrow`` with ``--arrow-batch`` texts per call (an LZ4 Arrow IPC
  stream, built before timing) against the same texts streamed to the backend
  over one ``tei.v1.Embed/EmbedStream`` per batch, one call at a time;
* the multiplexer alone, no backend involved: ``EmbedArrow`` with ``noop``
  set, and unary ``Embed`` calls that are routed to ``minilm`` and then
  refused for lacking their ``request`` (INVALID_ARGUMENT: parse, route,
  answer) or refused by routing itself (unknown instance: NOT_FOUND);
* the multiplexer process's CPU time per text during its measurements, to
  tell where the hop costs (all three processes share this machine's CPUs).

Each direct/multiplexer pair runs alternately in one run, in halves ordered
direct, mux, mux, direct, so both see the same machine state. Targets: at
most 2 ms added p50 latency for unary Embed at concurrency 1, and an Arrow
throughput ratio (multiplexer / direct) of at least 0.98. Both children are
stopped at the end, on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import MODEL, free_port, sentences  # noqa: E402
from teisup.bench import arrow_ipc  # noqa: E402
from teisup.supervision import ChildState  # noqa: E402

INSTANCE = "minilm"
MUX = "/tei_multiplexer.v1.TeiMultiplexer"
POOL = 4096  # distinct sentences the unary calls cycle through
ARROW_BATCHES = 4  # distinct Arrow batches the Arrow calls cycle through
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


# -- the multiplexer's process ---------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """The one instance the multiplexer sees (what `InstanceManager.all()` gives)."""

    name: str
    model_id: str
    port: int
    pid: int
    status: ChildState = ChildState.RUNNING
    spec: Any = field(default_factory=lambda: SimpleNamespace(max_concurrent_requests=512))


class Instances:
    def __init__(self, record: Record) -> None:
        self.record = record

    def all(self) -> list[Record]:
        return [self.record]


def serve_mux(backend_port: int, backend_pid: int, mux_port: int) -> int:
    """Serve the multiplexer until stdin closes (the parent ended) or a signal."""
    import trio

    from teisup.grpc import Multiplexer

    record = Record(INSTANCE, MODEL, port=backend_port, pid=backend_pid)

    async def run() -> None:
        mux = Multiplexer(Instances(record), host="127.0.0.1", port=mux_port)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(mux.serve)
            print(f"listening {port}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


# -- children ---------------------------------------------------------------------------


class Child:
    """A child process, in its own session (Ctrl-C reaches only this script, which stops it)."""

    def __init__(self, name: str, argv: list[str], *, stdin: int | None = None) -> None:
        self.name = name
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=ROOT,
            env={**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )  # fmt: skip

    def wait_for(self, predicate: Callable[[str], bool]) -> str:
        """The first stdout line for which ``predicate`` holds; the rest is drained in a thread."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if predicate(line.rstrip()):
                threading.Thread(target=self._drain, daemon=True).start()
                return line.rstrip()
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) before ready:\n{tail}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def stop(self) -> None:
        """End of stdin (the multiplexer's signal to stop), then SIGTERM, then SIGKILL."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
                self.proc.wait(timeout=5)
        for stop, grace in ((self.proc.terminate, 20), (self.proc.kill, None)):
            if self.proc.poll() is not None:
                break
            stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.stderr.close()


# -- measuring --------------------------------------------------------------------------


@dataclass
class Figures:
    """Calls timed over some wall-clock seconds (possibly several runs merged)."""

    texts: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    mux_cpu: float = 0.0  # CPU seconds the multiplexer's process used meanwhile

    def __add__(self, other: Figures) -> Figures:
        return Figures(
            self.texts + other.texts,
            self.seconds + other.seconds,
            self.latencies + other.latencies,
            self.mux_cpu + other.mux_cpu,
        )

    @property
    def rate(self) -> float:
        return self.texts / self.seconds

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def cpu_us_per_text(self) -> float:
        return self.mux_cpu / self.texts * 1e6


Call = Callable[[int], Awaitable[int]]
"""One call: ``call(i)`` sends the i-th request and returns how many texts it embedded."""


async def load(call: Call, concurrency: int, seconds: float, mux_pid: int) -> Figures:
    """``concurrency`` callers calling back to back for ``seconds``."""
    figures = Figures()
    counter = iter(range(sys.maxsize))
    start = time.perf_counter()
    end = start + seconds
    cpu = cpu_seconds(mux_pid)

    async def caller() -> None:
        while time.perf_counter() < end:
            i = next(counter)
            sent = time.perf_counter()
            texts = await call(i)  # awaited first: ``x += await`` would lose updates
            figures.texts += texts
            figures.latencies.append(time.perf_counter() - sent)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(caller())
    figures.seconds = time.perf_counter() - start
    figures.mux_cpu = cpu_seconds(mux_pid) - cpu
    return figures


async def side_by_side(
    direct: Call, mux: Call, concurrency: int, seconds: float, mux_pid: int
) -> tuple[Figures, Figures]:
    """Both calls, warmed, then timed in halves: direct, mux, mux, direct."""
    warm = min(1.0, seconds / 4)
    await load(direct, concurrency, warm, mux_pid)
    await load(mux, concurrency, warm, mux_pid)
    half = seconds / 2
    d1 = await load(direct, concurrency, half, mux_pid)
    m1 = await load(mux, concurrency, half, mux_pid)
    m2 = await load(mux, concurrency, half, mux_pid)
    d2 = await load(direct, concurrency, half, mux_pid)
    return d1 + d2, m1 + m2


async def alone(call: Call, concurrency: int, seconds: float, mux_pid: int) -> Figures:
    await load(call, concurrency, min(1.0, seconds / 4), mux_pid)
    return await load(call, concurrency, seconds, mux_pid)


HEADER = (
    f"{'':<34} {'direct/s':>9} {'mux/s':>9} {'ratio':>6} {'p50 d':>7} {'p50 m':>7} "
    f"{'+p50':>6} {'p99 d':>7} {'p99 m':>7} {'mux CPU':>8}"
)
UNITS = (
    f"{'':<34} {'':>9} {'':>9} {'':>6} {'ms':>7} {'ms':>7} {'ms':>6} {'ms':>7} {'ms':>7} "
    f"{'us/text':>8}"
)


def row(label: str, direct: Figures | None, mux: Figures) -> str:
    if direct is None:
        return (
            f"{label:<34} {'-':>9} {mux.rate:>9.1f} {'-':>6} {'-':>7} "
            f"{mux.percentile_ms(0.5):>7.2f} {'-':>6} {'-':>7} {mux.percentile_ms(0.99):>7.2f} "
            f"{mux.cpu_us_per_text:>8.0f}"
        )
    added = mux.percentile_ms(0.5) - direct.percentile_ms(0.5)
    return (
        f"{label:<34} {direct.rate:>9.1f} {mux.rate:>9.1f} {mux.rate / direct.rate:>6.2f} "
        f"{direct.percentile_ms(0.5):>7.2f} {mux.percentile_ms(0.5):>7.2f} {added:>+6.2f} "
        f"{direct.percentile_ms(0.99):>7.2f} {mux.percentile_ms(0.99):>7.2f} "
        f"{mux.cpu_us_per_text:>8.0f}"
    )


async def measure(args: argparse.Namespace, backend_port: int, mux_port: int, mux_pid: int) -> None:
    import grpc  # type: ignore[import-untyped,unused-ignore]
    import pyarrow as pa

    from teisup.proto.tei.v1 import tei_pb2
    from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2

    seconds: float = args.seconds
    batch: int = args.arrow_batch
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    target = mux_pb2.Target(instance_name=INSTANCE)
    texts = sentences(POOL)
    direct_requests = [tei_pb2.EmbedRequest(inputs=t) for t in texts]
    mux_requests = [mux_pb2.EmbedRequest(target=target, request=r) for r in direct_requests]
    batches = [sentences(batch, offset=POOL + k * batch) for k in range(ARROW_BATCHES)]
    stream_batches = [[tei_pb2.EmbedRequest(inputs=t) for t in b] for b in batches]
    arrow_requests = [
        mux_pb2.EmbedArrowRequest(target=target, arrow_ipc=arrow_ipc(b)) for b in batches
    ]
    noop_requests = [
        mux_pb2.EmbedArrowRequest(target=target, arrow_ipc=arrow_ipc(b), noop=True) for b in batches
    ]
    routed_refusal = mux_pb2.EmbedRequest(target=target)  # no ``request``: INVALID_ARGUMENT
    unknown = mux_pb2.EmbedRequest(
        target=mux_pb2.Target(instance_name="no-such-instance"), request=direct_requests[0]
    )

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{backend_port}", options=options) as to_backend,
        grpc.aio.insecure_channel(f"127.0.0.1:{mux_port}", options=options) as to_mux,
    ):
        direct_embed = to_backend.unary_unary(
            "/tei.v1.Embed/Embed",
            request_serializer=tei_pb2.EmbedRequest.SerializeToString,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        direct_stream = to_backend.stream_stream(
            "/tei.v1.Embed/EmbedStream",
            request_serializer=tei_pb2.EmbedRequest.SerializeToString,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        mux_embed = to_mux.unary_unary(
            f"{MUX}/Embed",
            request_serializer=mux_pb2.EmbedRequest.SerializeToString,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        mux_arrow = to_mux.unary_unary(
            f"{MUX}/EmbedArrow",
            request_serializer=mux_pb2.EmbedArrowRequest.SerializeToString,
            response_deserializer=mux_pb2.EmbedArrowResponse.FromString,
        )

        async def unary_direct(i: int) -> int:
            answer = await direct_embed(direct_requests[i % POOL])
            assert len(answer.embeddings) == 384
            return 1

        async def unary_mux(i: int) -> int:
            answer = await mux_embed(mux_requests[i % POOL])
            assert len(answer.embeddings) == 384
            return 1

        async def stream_direct(i: int) -> int:
            rows = 0
            async for answer in direct_stream(iter(stream_batches[i % ARROW_BATCHES])):
                assert len(answer.embeddings) == 384
                rows += 1
            assert rows == batch
            return rows

        def arrow_call(requests: list[Any]) -> Call:
            async def call(i: int) -> int:
                answer = await mux_arrow(requests[i % ARROW_BATCHES])
                table = pa.ipc.open_stream(answer.arrow_ipc).read_all()
                assert table.num_rows == batch
                return int(table.num_rows)

            return call

        def refused(request: Any, code: grpc.StatusCode) -> Call:
            async def call(i: int) -> int:
                try:
                    await mux_embed(request)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != code:
                        raise
                    return 1
                raise AssertionError("the multiplexer accepted a call it should refuse")

            return call

        print(HEADER)
        print(UNITS)
        unary_c1: tuple[Figures, Figures] | None = None
        for c in concurrencies:
            d, m = await side_by_side(unary_direct, unary_mux, c, seconds, mux_pid)
            unary_c1 = (d, m) if c == 1 else unary_c1
            print(row(f"unary Embed, c={c}", d, m), flush=True)
        d, m = await side_by_side(stream_direct, arrow_call(arrow_requests), 1, seconds, mux_pid)
        arrow_ratio = m.rate / d.rate
        print(row(f"{batch} texts: EmbedStream / EmbedArrow", d, m), flush=True)
        print("multiplexer alone (no backend call):")
        noop = await alone(arrow_call(noop_requests), 1, seconds, mux_pid)
        print(row(f"  EmbedArrow noop, {batch} texts", None, noop), flush=True)
        for c in concurrencies:
            invalid = refused(routed_refusal, grpc.StatusCode.INVALID_ARGUMENT)
            f = await alone(invalid, c, seconds, mux_pid)
            print(row(f"  Embed routed, refused, c={c}", None, f), flush=True)
        for c in concurrencies:
            f = await alone(refused(unknown, grpc.StatusCode.NOT_FOUND), c, seconds, mux_pid)
            print(row(f"  Embed unknown instance, c={c}", None, f), flush=True)

    print()
    if unary_c1 is not None:
        d, m = unary_c1
        added = m.percentile_ms(0.5) - d.percentile_ms(0.5)
        print(
            f"added p50 latency, unary Embed c=1: {added:+.2f} ms (target <= 2 ms) "
            f"{'ok' if added <= 2 else 'MISSED'}"
        )
    print(
        f"Arrow throughput ratio mux/direct: {arrow_ratio:.2f} (target >= 0.98) "
        f"{'ok' if arrow_ratio >= 0.98 else 'MISSED'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement and side")
    parser.add_argument("--concurrency", default="1,32", help="unary calls in flight at once")
    parser.add_argument("--arrow-batch", type=int, default=1000, help="texts per Arrow call")
    parser.add_argument("--serve-mux", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mux:
        return serve_mux(*args.serve_mux)

    # SIGTERM unwinds like Ctrl-C, so the children are stopped either way.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    children: list[Child] = []
    try:
        backend_port = free_port()
        argv = [sys.executable, "-m", "teisup.embedded", "--model-id", MODEL]
        argv += ["--hostname", "127.0.0.1", "--port", str(backend_port)]
        argv += ["--prometheus-port", str(free_port()), "--max-concurrent-requests", "1024"]
        started = time.perf_counter()
        backend = Child("backend", argv)
        children.append(backend)
        backend.wait_for(lambda line: line.endswith("Ready"))
        ready_s = time.perf_counter() - started

        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-mux"]
        argv += [str(backend_port), str(backend.proc.pid), str(free_port())]
        mux = Child("multiplexer", argv, stdin=subprocess.PIPE)
        children.append(mux)
        mux_port = int(mux.wait_for(lambda line: line.startswith("listening ")).split()[1])

        print(
            f"backend {MODEL}: pid {backend.proc.pid}, port {backend_port}, "
            f"Ready in {ready_s:.1f} s; multiplexer: pid {mux.proc.pid}, port {mux_port}"
        )
        print(
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.seconds:g} s "
            f"per side, direct and mux alternating (d, m, m, d); grpc.aio client"
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
