#!/usr/bin/env python3
"""teisup's multiplexer beside a grpcio.aio reference, on a backend that costs nothing.

    python benchmarks/mux_compare.py [--seconds 4] [--concurrency 1,32]
    python benchmarks/mux_compare.py --h2load [--grpc-workers N] [--seconds 4]

Starts a real ``python -m teisup`` whose one instance, ``standin``, is
`benchmarks/tei_standin.py` (launched by teisup through ``TEI_BINARY_PATH``;
it answers ``tei.v1.Embed`` with a fixed vector in tens of microseconds), and
`benchmarks/reference_mux.py` routing to that same instance. Then, for the
same unary Embed call (one short text):

* **default mode**: a ``grpc.aio`` client in this process calls it straight to
  the instance (direct), through teisup's gRPC multiplexer and through the
  reference, alternating in one run (d, t, r, r, t, d, in halves), at each
  ``--concurrency``; then teisup's HTTP data plane (``/instances/standin/embed``
  and ``/v1/embeddings``, an httpx client) beside teisup's gRPC path. Each row
  gives calls/s, p50/p99 and the multiplexer's CPU per call, read from
  ``/proc/<pid>/stat`` over teisup's process tree without the instance's (so
  worker processes count) and over the reference's process; then the CPU ratio
  teisup/reference;
* **--h2load**: ``h2load`` (nghttp2-client), whose client costs almost nothing,
  drives each path as hard as it goes (``-c`` connections x ``-m`` streams) to
  find its ceiling: direct, teisup, reference, ``EmbedArrow`` with ``noop`` (a
  call teisup answers itself) and the HTTP data plane (HTTP/1.1). A gRPC body is
  the 5-byte prefix plus the message. ``--grpc-workers N`` runs teisup with that
  many gRPC worker processes (``TEISUP_GRPC_WORKERS``), so two runs compare
  the ceilings with 1 and 2 workers.

Every child is stopped at the end, on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import free_port, sentences  # noqa: E402
from benchmarks.mux_overhead import Child  # noqa: E402
from teisup.bench import arrow_ipc  # noqa: E402
from teisup.proto.tei.v1 import tei_pb2  # noqa: E402
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2  # noqa: E402

INSTANCE = "standin"
MODEL = "standin/fixed-vector"
DIM = 384
MUX = "/tei_multiplexer.v1.TeiMultiplexer"
POOL = 1024
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
STANDIN = ROOT / "benchmarks" / "tei_standin.py"
REFERENCE = ROOT / "benchmarks" / "reference_mux.py"


# -- processes and their CPU -------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of ``pid``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def tree_cpu(root: int, exclude: int | None = None) -> float:
    """CPU seconds of ``root`` and its descendants, without ``exclude``'s subtree."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None:
                table[int(entry.name)] = found
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid == exclude or pid not in table:
            continue
        total += table[pid][1]
        todo.extend(children.get(pid, []))
    return total


@dataclass
class Meter:
    """Reads one multiplexer's CPU: a process tree, minus the instance's."""

    name: str
    pid: int | None
    exclude: int | None = None

    def read(self) -> float:
        return tree_cpu(self.pid, self.exclude) if self.pid is not None else 0.0

    def read_root(self) -> float:
        """CPU seconds of the root process alone (teisup's manager, without its workers)."""
        found = _stat(self.pid) if self.pid is not None else None
        return found[1] if found is not None else 0.0


# -- teisup and the reference ------------------------------------------------------------


def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=90) as answer:
        return json.loads(answer.read() or b"null")


@dataclass
class Setup:
    api_port: int
    grpc_port: int
    instance_port: int
    teisup: Meter
    reference: Meter
    reference_port: int


def start(root: Path, grpc_workers: int | None, children: list[Child]) -> Setup:
    base = random.randrange(10_000, 30_000, 128)
    (root / "teisup.toml").write_text(
        f"instance_port_start = {base}\ninstance_port_end = {base + 63}\n"
        f"prometheus_port_start = {base + 64}\nprometheus_port_end = {base + 127}\n"
    )
    api_port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "teisup", "-c", str(root / "teisup.toml")]
    argv += ["--api-port", str(api_port), "--grpc-port", str(grpc_port)]
    argv += ["--state-file", str(root / "state.toml")]
    env = {
        "TEI_BINARY_PATH": str(STANDIN),
        "TEISUP_BIND_HOST": "127.0.0.1",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    if grpc_workers is not None:
        env["TEISUP_GRPC_WORKERS"] = str(grpc_workers)
    with _env(env):
        manager = Child("teisup", argv)
    children.append(manager)
    threading.Thread(target=manager._drain, daemon=True).start()
    api = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            http("GET", f"{api}/instances")
            break
        except OSError:
            if manager.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("teisup did not start") from None
            time.sleep(0.2)
    http("POST", f"{api}/instances", {"name": INSTANCE, "model_id": MODEL})
    info = http("GET", f"{api}/instances/{INSTANCE}?wait=running&timeout=60")
    instance_port, instance_pid = int(info["port"]), int(info["pid"])
    argv = [sys.executable, str(REFERENCE), "--port", str(free_port())]
    argv += ["--route", f"{INSTANCE}=127.0.0.1:{instance_port}"]
    reference = Child("reference", argv, stdin=subprocess.PIPE)
    children.append(reference)
    reference_port = int(reference.wait_for(lambda line: line.startswith("listening ")).split()[1])
    return Setup(
        api_port,
        grpc_port,
        instance_port,
        Meter("teisup", manager.proc.pid, exclude=instance_pid),
        Meter("reference", reference.proc.pid),
        reference_port,
    )


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Any:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- the grpc.aio client's measurements ------------------------------------------------


@dataclass
class Figures:
    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    #: The part of ``cpu`` spent in the root process (teisup's manager).
    cpu_root: float = 0.0

    def __add__(self, other: Figures) -> Figures:
        return Figures(
            self.calls + other.calls,
            self.seconds + other.seconds,
            self.latencies + other.latencies,
            self.cpu + other.cpu,
            self.cpu_root + other.cpu_root,
        )

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.calls * 1e6

    @property
    def cpu_root_us(self) -> float:
        return self.cpu_root / self.calls * 1e6


Call = Callable[[int], Awaitable[None]]


async def load(call: Call, concurrency: int, seconds: float, meter: Meter | None) -> Figures:
    figures = Figures()
    counter = iter(range(sys.maxsize))
    begin = time.perf_counter()
    end = begin + seconds
    cpu = meter.read() if meter is not None else 0.0
    cpu_root = meter.read_root() if meter is not None else 0.0

    async def caller() -> None:
        while time.perf_counter() < end:
            sent = time.perf_counter()
            await call(next(counter))
            figures.latencies.append(time.perf_counter() - sent)
            figures.calls += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(caller())
    figures.seconds = time.perf_counter() - begin
    figures.cpu = (meter.read() - cpu) if meter is not None else 0.0
    figures.cpu_root = (meter.read_root() - cpu_root) if meter is not None else 0.0
    return figures


async def alternate(
    paths: list[tuple[Call, Meter | None]], concurrency: int, seconds: float
) -> list[Figures]:
    """Each path warmed, then timed in halves: forwards, then backwards."""
    for call, meter in paths:
        await load(call, concurrency, min(1.0, seconds / 4), meter)
    results = [Figures() for _ in paths]
    order = list(range(len(paths)))
    for sequence in (order, order[::-1]):
        for i in sequence:
            call, meter = paths[i]
            results[i] = results[i] + await load(call, concurrency, seconds / 2, meter)
    return results


HEADER = f"{'':<30} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/call':>11}"


def row(label: str, f: Figures, cpu: bool = True) -> str:
    cpu_text = f"{f.cpu_us:>11.0f}" if cpu else f"{'-':>11}"
    return f"{label:<30} {f.rate:>8.0f} {f.ms(0.5):>7.2f} {f.ms(0.99):>7.2f} {cpu_text}"


async def measure_grpc(setup: Setup, seconds: float, concurrencies: list[int]) -> None:
    import grpc  # type: ignore[import-untyped,unused-ignore]
    import httpx

    texts = sentences(POOL)
    target = mux_pb2.Target(instance_name=INSTANCE)
    direct_requests = [tei_pb2.EmbedRequest(inputs=t) for t in texts]
    mux_requests = [mux_pb2.EmbedRequest(target=target, request=r) for r in direct_requests]

    def embed_of(channel: Any, path: str, serializer: Any) -> Any:
        return channel.unary_unary(
            path,
            request_serializer=serializer,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{setup.instance_port}") as to_instance,
        grpc.aio.insecure_channel(f"127.0.0.1:{setup.grpc_port}") as to_teisup,
        grpc.aio.insecure_channel(f"127.0.0.1:{setup.reference_port}") as to_reference,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{setup.api_port}", limits=limits) as web,
    ):
        direct_embed = embed_of(
            to_instance, "/tei.v1.Embed/Embed", tei_pb2.EmbedRequest.SerializeToString
        )
        teisup_embed = embed_of(to_teisup, f"{MUX}/Embed", mux_pb2.EmbedRequest.SerializeToString)
        reference_embed = embed_of(
            to_reference, f"{MUX}/Embed", mux_pb2.EmbedRequest.SerializeToString
        )

        def via(stub: Any, requests: list[Any]) -> Call:
            async def call(i: int) -> None:
                answer = await stub(requests[i % POOL])
                assert len(answer.embeddings) == DIM

            return call

        async def tei_http(i: int) -> None:
            body = {"inputs": texts[i % POOL]}
            answer = await web.post(f"/instances/{INSTANCE}/embed", json=body)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()[0]) == DIM

        async def openai_http(i: int) -> None:
            body = {"input": texts[i % POOL], "model": INSTANCE}
            answer = await web.post("/v1/embeddings", json=body)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["data"][0]["embedding"]) == DIM

        print(HEADER)
        ratios = []
        for c in concurrencies:
            direct, teisup, reference = await alternate(
                [
                    (via(direct_embed, direct_requests), None),
                    (via(teisup_embed, mux_requests), setup.teisup),
                    (via(reference_embed, mux_requests), setup.reference),
                ],
                c,
                seconds,
            )
            print(row(f"direct Embed, c={c}", direct, cpu=False))
            print(row(f"teisup Embed, c={c}", teisup))
            print(row(f"reference Embed, c={c}", reference))
            ratio = teisup.cpu_us / reference.cpu_us
            ratios.append((c, ratio))
            print(
                f"  teisup/reference CPU per call, c={c}: {ratio:.2f}"
                f" (teisup's manager process: {teisup.cpu_root_us:.0f} us/call of it)",
                flush=True,
            )
        for c in concurrencies:
            grpc_path, tei_route, openai_route = await alternate(
                [
                    (via(teisup_embed, mux_requests), setup.teisup),
                    (tei_http, setup.teisup),
                    (openai_http, setup.teisup),
                ],
                c,
                seconds,
            )
            print(row(f"teisup gRPC Embed, c={c}", grpc_path))
            print(row(f"teisup HTTP /embed, c={c}", tei_route))
            print(row(f"teisup HTTP /v1/embeddings, c={c}", openai_route), flush=True)
    print()
    for c, ratio in ratios:
        verdict = "ok" if ratio <= 1.5 else "MISSED"
        print(
            f"teisup/reference CPU per forwarded call, c={c}: {ratio:.2f} (target <= 1.5) {verdict}"
        )


# -- h2load ------------------------------------------------------------------------------


def grpc_body(message: Any) -> bytes:
    payload: bytes = message.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


HTTP_STREAMS = 4
H2LOAD_RATE = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
H2LOAD_DONE = re.compile(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded")


def h2load(
    url: str, body: bytes, *, seconds: float, clients: int, streams: int, grpc: bool, meter: Meter
) -> tuple[float, float, int]:
    """(requests/s, multiplexer CPU us per request, requests done) for one h2load run.

    Counted runs (``-n``), never timed ones: h2load 1.52's ``-D`` mode now and
    then starts no request at all for the whole duration (measured against
    every server here, warm-up or not), which read as a server that answers
    nothing. A short counted probe sizes the run to last about ``seconds``.
    """
    concurrent = clients * (streams if grpc else min(streams, HTTP_STREAMS))
    probe_rate, _, _ = _h2load_run(url, body, concurrent * 8, clients, streams, grpc, meter)
    count = max(concurrent * 8, int(probe_rate * seconds))
    return _h2load_run(url, body, count, clients, streams, grpc, meter)


def _h2load_run(
    url: str, body: bytes, count: int, clients: int, streams: int, grpc: bool, meter: Meter
) -> tuple[float, float, int]:
    with tempfile.NamedTemporaryFile(suffix=".bin") as data:
        data.write(body)
        data.flush()
        argv = ["h2load", "-n", str(count), "-d", data.name, "-c", str(clients)]
        if grpc:
            argv += ["-m", str(streams)]
            argv += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        else:
            # h2c, prior knowledge; a few streams per connection, as HTTP
            # clients use them.
            argv += ["-m", str(min(streams, HTTP_STREAMS))]
            argv += ["-H", "content-type: application/json"]
        cpu = meter.read()
        out = subprocess.run([*argv, url], capture_output=True, text=True, check=False).stdout
        used = meter.read() - cpu
    rate = H2LOAD_RATE.search(out)
    done = H2LOAD_DONE.search(out)
    if rate is None or done is None or int(done.group(2)) == 0:
        raise RuntimeError(f"h2load said:\n{out[-2000:]}")
    requests = int(done.group(2))
    return float(rate.group(1)), used / max(requests, 1) * 1e6, requests


def measure_h2load(setup: Setup, seconds: float, clients: int, streams: int) -> None:
    target = mux_pb2.Target(instance_name=INSTANCE)
    text = sentences(1)[0]
    inner = tei_pb2.EmbedRequest(inputs=text)
    embed = grpc_body(mux_pb2.EmbedRequest(target=target, request=inner))
    noop = grpc_body(
        mux_pb2.EmbedArrowRequest(target=target, arrow_ipc=arrow_ipc([text] * 32), noop=True)
    )
    nothing = Meter("nobody", None)
    web = f"http://127.0.0.1:{setup.api_port}"
    runs = [
        ("direct Embed", f"http://127.0.0.1:{setup.instance_port}/tei.v1.Embed/Embed",
         grpc_body(inner), True, nothing),
        ("teisup Embed", f"http://127.0.0.1:{setup.grpc_port}{MUX}/Embed", embed, True,
         setup.teisup),
        ("reference Embed", f"http://127.0.0.1:{setup.reference_port}{MUX}/Embed", embed, True,
         setup.reference),
        ("teisup EmbedArrow noop (32)", f"http://127.0.0.1:{setup.grpc_port}{MUX}/EmbedArrow",
         noop, True, setup.teisup),
        ("teisup HTTP /embed", f"{web}/instances/{INSTANCE}/embed",
         json.dumps({"inputs": text}).encode(), False, setup.teisup),
        ("teisup HTTP /v1/embeddings", f"{web}/v1/embeddings",
         json.dumps({"input": text, "model": INSTANCE}).encode(), False, setup.teisup),
    ]  # fmt: skip
    print(
        f"h2load -c {clients} -m {streams} (HTTP/2 without TLS; the HTTP data plane "
        f"-m {min(streams, HTTP_STREAMS)}), {seconds:g} s each"
    )
    print(f"{'':<30} {'req/s':>8} {'CPU us/req':>10} {'done':>8}")
    for label, url, body, is_grpc, meter in runs:
        try:
            for span in (1.0, seconds):  # a warm-up, then the measured run
                rate, cpu, done = h2load(
                    url, body, seconds=span, clients=clients, streams=streams, grpc=is_grpc,
                    meter=meter,
                )  # fmt: skip
        except RuntimeError:
            # Seen on the HTTP data plane under h2load: not one answer in the run.
            print(f"{label:<30} {'no answer':>8}", flush=True)
            continue
        cpu_text = f"{cpu:>10.0f}" if meter.pid is not None else f"{'-':>10}"
        print(f"{label:<30} {rate:>8.0f} {cpu_text} {done:>8}", flush=True)


def check_calls(setup: Setup) -> None:
    """One call each way, checked, before anything is timed (h2load counts any 200)."""
    import grpc  # type: ignore[import-untyped,unused-ignore]

    target = mux_pb2.Target(instance_name=INSTANCE)
    request = mux_pb2.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs="check"))
    for port in (setup.grpc_port, setup.reference_port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = channel.unary_unary(
                f"{MUX}/Embed",
                request_serializer=mux_pb2.EmbedRequest.SerializeToString,
                response_deserializer=tei_pb2.EmbedResponse.FromString,
            )
            # wait_for_ready: gRPC worker processes may still be starting.
            answer = stub(request, timeout=60, wait_for_ready=True)
            assert len(answer.embeddings) == DIM


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per path and measurement")
    parser.add_argument("--concurrency", default="1,32", help="grpc.aio calls in flight at once")
    parser.add_argument("--h2load", action="store_true", help="find the ceilings with h2load")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections")
    parser.add_argument("--streams", type=int, default=32, help="h2load streams per connection")
    parser.add_argument("--grpc-workers", type=int, help="teisup's gRPC worker processes")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    setup: Setup | None = None
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="mux-compare-") as root:
        try:
            setup = start(Path(root), args.grpc_workers, children)
            check_calls(setup)
            workers = args.grpc_workers if args.grpc_workers is not None else "default"
            print(
                f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; teisup pid "
                f"{setup.teisup.pid} (grpc_workers {workers}), reference pid "
                f"{setup.reference.pid}, instance port {setup.instance_port}"
            )
            if args.h2load:
                measure_h2load(setup, args.seconds, args.clients, args.streams)
            else:
                concurrencies = [int(c) for c in args.concurrency.split(",")]
                asyncio.run(measure_grpc(setup, args.seconds, concurrencies))
            print(f"load average after: {os.getloadavg()[0]:.2f}")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            for child in reversed(children):
                child.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
