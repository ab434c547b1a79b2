"""``teisup-bench``: load a teisup multiplexer and print what it did, as JSON.

Flag-compatible with tei-manager's ``bench-client``::

    teisup-bench -e http://localhost:9001 -i bge-small --mode standard -n 10000 -b 100
    teisup-bench -e http://localhost:9001 -i bge-small --mode arrow -n 100000 -b 1000
    teisup-bench -e https://localhost:9001 -i bge-small --cert client.pem --key client-key.pem \\
        --ca ca.pem --mode arrow -n 100000 -b 1000

Modes: ``standard`` sends one text per Embed call; ``arrow`` sends batches of
``-b`` texts per EmbedArrow call (LZ4-compressed Arrow IPC); ``stream`` sends
``-b`` texts over one EmbedStream per batch. ``-c`` calls are in flight at
once. Every call runs under a deadline, so a rejected TLS handshake or a dead
server ends the run with failures instead of hanging. The output has the
peer's fields (mode, instance_name, num_texts, batch_size, num_requests,
total_duration_secs, throughput_per_sec, successful, failed) plus latency
percentiles in milliseconds; when stderr is a terminal, a progress bar is
drawn there. Its source doubles as an example client.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import pyarrow as pa
import trio

from .proto.tei.v1 import tei_pb2
from .proto.tei_multiplexer.v1 import multiplexer_pb2
from .rpc import Channel, RpcError, call_with_deadline, open_channel

__all__ = ["main", "run_bench"]

SERVICE = "tei_multiplexer.v1.TeiMultiplexer"

WORDS = [
    "supervisor",
    "instance",
    "embedding",
    "model",
    "restart",
    "stream",
    "batch",
    "arrow",
    "vector",
    "query",
]


def make_texts(n: int) -> list[str]:
    """``n`` short, distinct sentences."""
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i // 7) % len(WORDS)]} number {i}" for i in range(n)]


def arrow_ipc(texts: Sequence[str]) -> bytes:
    """One RecordBatch with a ``text`` column, as an LZ4-compressed IPC stream."""
    batch = pa.record_batch([pa.array(list(texts), pa.utf8())], names=["text"])
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def run_bench(
    host: str,
    port: int,
    *,
    instance: str,
    mode: str,
    num_texts: int,
    batch_size: int,
    concurrency: int,
    noop: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,  # noqa: ASYNC109 - per call, the bench's own bound
    token: str | None = None,
    max_message_length: int = 32 << 20,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run one benchmark and return the report (see the module docstring).

    ``token`` is sent as ``authorization: Bearer <token>`` metadata;
    ``progress(done, total)`` is called (texts) as calls finish.
    """
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    texts = make_texts(num_texts)
    size = 1 if mode == "standard" else batch_size
    batches = [texts[i : i + size] for i in range(0, len(texts), size)]
    target = multiplexer_pb2.Target(instance_name=instance)
    latencies: list[float] = []
    done = {"successful": 0, "failed": 0}
    errors: dict[str, int] = {}

    async def one(channel: Channel, batch: list[str]) -> None:
        if mode == "arrow":
            request = multiplexer_pb2.EmbedArrowRequest(
                target=target, arrow_ipc=arrow_ipc(batch), noop=noop
            )
            response = await channel.unary(
                SERVICE, "EmbedArrow", request, multiplexer_pb2.EmbedArrowResponse,
                metadata=metadata,
            )  # fmt: skip
            rows = pa.ipc.open_stream(response.arrow_ipc).read_all().num_rows
            if rows != len(batch):
                raise RuntimeError(f"{rows} rows back for {len(batch)} texts")
        elif mode == "stream":
            count = 0
            async with (
                channel.stream(
                    SERVICE, "EmbedStream", multiplexer_pb2.EmbedRequest, tei_pb2.EmbedResponse,
                    metadata=metadata,
                ) as call,
                trio.open_nursery() as nursery,
            ):  # fmt: skip

                async def send() -> None:
                    for text in batch:
                        await call.send(
                            multiplexer_pb2.EmbedRequest(
                                target=target, request=tei_pb2.EmbedRequest(inputs=text)
                            )
                        )
                    await call.done_sending()

                nursery.start_soon(send)
                while await call.receive() is not None:
                    count += 1
            if count != len(batch):
                raise RuntimeError(f"{count} responses for {len(batch)} texts")
        else:
            request = multiplexer_pb2.EmbedRequest(
                target=target, request=tei_pb2.EmbedRequest(inputs=batch[0])
            )
            await channel.unary(SERVICE, "Embed", request, tei_pb2.EmbedResponse, metadata=metadata)

    async def worker(queue: trio.MemoryReceiveChannel[list[str]]) -> None:
        current: list[str] = []  # the batch in flight, if the connection dies under it
        try:
            # Connecting fails fast when refused; a TLS rejection shows at the
            # first call, which runs under its deadline like every call.
            async with open_channel(
                host, port, ssl_context=ssl_context, max_message_length=max_message_length
            ) as channel:
                async for batch in queue:
                    current = batch
                    began = time.perf_counter()
                    try:
                        await call_with_deadline(
                            partial(one, channel, batch), timeout=timeout, target=f"{host}:{port}"
                        )
                    except (RpcError, RuntimeError) as exc:
                        done["failed"] += len(batch)
                        key = type(exc).__name__
                        errors[key] = errors.get(key, 0) + 1
                    else:
                        done["successful"] += len(batch)
                        latencies.append((time.perf_counter() - began) * 1000)
                    current = []
                    if progress is not None:
                        progress(done["successful"] + done["failed"], num_texts)
        except RpcError as exc:
            # The server cannot be reached (or the connection died, a TLS
            # rejection among the causes): this call and every one left fail.
            failed = len(current) + sum(len(b) for b in queue_rest(queue))
            done["failed"] += failed
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1
            if progress is not None:
                progress(done["successful"] + done["failed"], num_texts)

    def queue_rest(queue: trio.MemoryReceiveChannel[list[str]]) -> list[list[str]]:
        rest = []
        while True:
            try:
                rest.append(queue.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return rest

    send, receive = trio.open_memory_channel[list[str]](math.inf)
    for batch in batches:
        send.send_nowait(batch)
    send.close()
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(max(1, concurrency)):
            nursery.start_soon(worker, receive.clone())
    receive.close()
    elapsed = time.perf_counter() - began
    report: dict[str, Any] = {
        "mode": mode,
        "instance_name": instance,
        "num_texts": num_texts,
        "batch_size": size,
        "num_requests": len(batches),
        "total_duration_secs": round(elapsed, 4),
        "throughput_per_sec": round(done["successful"] / elapsed, 2) if elapsed else 0.0,
        "successful": done["successful"],
        "failed": done["failed"],
        "concurrency": concurrency,
        "latency_ms": {
            "p50": round(_percentile(latencies, 0.50), 3),
            "p95": round(_percentile(latencies, 0.95), 3),
            "p99": round(_percentile(latencies, 0.99), 3),
        },
    }
    if errors:
        report["errors"] = errors
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teisup-bench", description=__doc__.splitlines()[0])
    parser.add_argument("-e", "--endpoint", default="http://localhost:9001")
    parser.add_argument("-i", "--instance", required=True, help="instance name to target")
    parser.add_argument("-m", "--mode", choices=["standard", "arrow", "stream"], default="standard")
    parser.add_argument("-n", "--num-texts", type=int, default=1000)
    parser.add_argument("-b", "--batch-size", type=int, default=100)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--noop", action="store_true", help="arrow: the multiplexer answers itself")
    parser.add_argument("--cert", help="client certificate (PEM)")
    parser.add_argument("--key", help="client key (PEM)")
    parser.add_argument("--ca", help="CA bundle to trust (PEM)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-call deadline, seconds")
    parser.add_argument(
        "--max-message-size-mb", type=int, default=32, help="largest message either way, MiB"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TEISUP_API_TOKEN"),
        help="API token sent as 'authorization: Bearer' (default: $TEISUP_API_TOKEN)",
    )
    return parser


def _tls(args: argparse.Namespace, scheme: str) -> ssl.SSLContext | None:
    if scheme != "https" and not (args.cert or args.ca):
        return None
    context = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["h2"])  # grpc servers refuse a TLS peer without it
    return context


class ProgressBar:
    """A one-line progress bar on a terminal, redrawn at most ten times a second."""

    def __init__(self, stream: Any, width: int = 40) -> None:
        self.stream = stream
        self.width = width
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{total} texts")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = urllib.parse.urlsplit(args.endpoint if "://" in args.endpoint else f"//{args.endpoint}")
    host, port = url.hostname or "localhost", url.port or 9001
    if not 1 <= args.max_message_size_mb <= 1023:
        print("teisup-bench: --max-message-size-mb must be 1..1023", file=sys.stderr)
        return 2
    for name in ("num_texts", "batch_size", "concurrency"):
        if getattr(args, name) < 1:
            print(f"teisup-bench: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    run: Callable[[], Awaitable[dict[str, Any]]] = lambda: run_bench(  # noqa: E731
        host,
        port,
        instance=args.instance,
        mode=args.mode,
        num_texts=args.num_texts,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        noop=args.noop,
        ssl_context=_tls(args, url.scheme),
        timeout=args.timeout,
        token=args.token,
        max_message_length=args.max_message_size_mb << 20,
        # Only for a person watching: never in a pipe or a log.
        progress=ProgressBar(sys.stderr) if sys.stderr.isatty() else None,
    )
    report = trio.run(run)
    print(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
