"""``teisup-bench``: load a teisup multiplexer and report what it did.

Flag-compatible with tei-manager's ``bench-client``::

    teisup-bench -e http://localhost:9001 -i bge-small --mode standard -n 10000 -b 100
    teisup-bench -e http://localhost:9001 -i bge-small --mode arrow -n 100000 -b 1000
    teisup-bench -e https://localhost:9001 -i bge-small --cert client.pem --key client-key.pem \\
        --ca ca.pem --mode arrow -n 100000 -b 1000

Modes: ``standard`` sends one text per Embed call, ``-b`` calls in flight at
once; ``arrow`` sends ``-b`` texts per EmbedArrow call (LZ4-compressed Arrow
IPC), one call at a time; ``stream`` sends ``-b`` texts over one EmbedStream
per batch, one stream at a time. ``-c`` sets the calls in flight in any mode.
The endpoint's scheme decides TLS (``https://``) or plaintext, as for
bench-client. Every call runs under a deadline (connecting included), so a
rejected TLS handshake or a dead server ends the run with failed calls
instead of hanging.

The report (JSON on stdout by default, ``--format table`` for people) has
bench-client's fields (mode, instance_name, num_texts, batch_size,
num_requests, total_duration_secs, throughput_per_sec, successful, failed:
texts), the calls that succeeded and failed, per-call latency percentiles
(p50/p90/p95/p99/max, milliseconds) and the failed calls grouped by gRPC
status code and message. When stderr is a terminal, a progress bar is drawn
there. Its source doubles as an example client.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa
import trio

from .proto.tei.v1 import tei_pb2
from .proto.tei_multiplexer.v1 import multiplexer_pb2
from .rpc import (
    Channel,
    RpcStatusError,
    RpcUnavailable,
    StatusCode,
    call_with_deadline,
    open_channel,
)

__all__ = ["ProgressBar", "main", "render_table", "run_bench"]

SERVICE = "tei_multiplexer.v1.TeiMultiplexer"
MODES = ("standard", "arrow", "stream")
FORMATS = ("json", "table")
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))

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


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``ordered`` (sorted, not empty)."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


class BadResponse(Exception):
    """An answer that does not match the call: the wrong number of rows or responses."""


@dataclass(frozen=True)
class Failure:
    """Why one call failed: a gRPC status code and its message.

    A status the server sent is reported as it came; a failure seen only by
    this client is given the code a gRPC client library reports for it
    (UNAVAILABLE: no connection or a broken one; DEADLINE_EXCEEDED: no answer
    in time; INTERNAL: an answer that does not fit the call).
    """

    code: StatusCode
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        if isinstance(exc, RpcStatusError):
            return cls(exc.code, exc.details)
        if isinstance(exc, RpcUnavailable):
            return cls(StatusCode.UNAVAILABLE, exc.reason)
        return cls(StatusCode.INTERNAL, f"bad response: {exc}")


class Tally:
    """What the calls of one run did: texts and calls by outcome, latencies, failures."""

    def __init__(self) -> None:
        self.successful_texts = 0
        self.failed_texts = 0
        self.successful_calls = 0
        self.latencies_ms: list[float] = []
        #: (calls, texts) per distinct failure, in the order first seen.
        self.failures: dict[Failure, list[int]] = {}

    @property
    def texts_done(self) -> int:
        return self.successful_texts + self.failed_texts

    @property
    def failed_calls(self) -> int:
        return sum(calls for calls, _ in self.failures.values())

    def succeeded(self, texts: int, latency_ms: float) -> None:
        self.successful_texts += texts
        self.successful_calls += 1
        self.latencies_ms.append(latency_ms)

    def failed(self, texts: int, failure: Failure) -> None:
        self.failed_texts += texts
        counts = self.failures.setdefault(failure, [0, 0])
        counts[0] += 1
        counts[1] += texts

    def latency_summary(self) -> dict[str, float | None]:
        """Per-call percentiles of the successful calls, ms; None when none succeeded."""
        ordered = sorted(self.latencies_ms)
        return {
            name: round(_percentile(ordered, q), 3) if ordered else None for name, q in PERCENTILES
        }

    def error_rows(self) -> list[dict[str, Any]]:
        """The failures, most calls first: code name, message, calls and texts."""
        rows = [
            {"code": f.code.name, "message": f.message, "calls": calls, "texts": texts}
            for f, (calls, texts) in self.failures.items()
        ]
        return sorted(rows, key=lambda row: -row["calls"])


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
    max_message_length: int = 100 << 20,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run one benchmark and return the report (see the module docstring).

    ``batch_size`` is texts per call in ``arrow`` and ``stream`` modes (one in
    ``standard``); ``concurrency`` is calls in flight, each worker on its own
    connection. A call that fails is counted once, with its `Failure`; a
    worker whose connection fails or breaks connects again for its next call,
    so every call is an attempt of its own. ``token`` is sent as
    ``authorization: Bearer <token>`` metadata; ``progress(done, total)`` is
    called (texts) as calls finish.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    texts = make_texts(num_texts)
    size = 1 if mode == "standard" else batch_size
    batches = [texts[i : i + size] for i in range(0, len(texts), size)]
    target = multiplexer_pb2.Target(instance_name=instance)
    address = f"{host}:{port}"
    requested = concurrency
    # No more workers than calls: the report says how many were in flight.
    concurrency = max(1, min(concurrency, len(batches)))
    tally = Tally()

    async def one(channel: Channel, batch: list[str]) -> None:
        if mode == "arrow":
            request = multiplexer_pb2.EmbedArrowRequest(
                target=target, arrow_ipc=arrow_ipc(batch), truncate=True, normalize=True,
                noop=noop,
            )  # fmt: skip
            response = await channel.unary(
                SERVICE, "EmbedArrow", request, multiplexer_pb2.EmbedArrowResponse,
                metadata=metadata,
            )  # fmt: skip
            try:
                rows = pa.ipc.open_stream(response.arrow_ipc).read_all().num_rows
            except pa.ArrowException as exc:
                raise BadResponse(f"unreadable Arrow IPC: {exc}") from None
            if rows != len(batch):
                raise BadResponse(f"{rows} rows back for {len(batch)} texts")
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
                        await call.send(embed_request(text))
                    await call.done_sending()

                nursery.start_soon(send)
                while await call.receive() is not None:
                    count += 1
            if count != len(batch):
                raise BadResponse(f"{count} responses for {len(batch)} texts")
        else:
            await channel.unary(
                SERVICE, "Embed", embed_request(batch[0]), tei_pb2.EmbedResponse,
                metadata=metadata,
            )  # fmt: skip

    def embed_request(text: str) -> multiplexer_pb2.EmbedRequest:
        return multiplexer_pb2.EmbedRequest(
            target=target, request=tei_pb2.EmbedRequest(inputs=text, truncate=True, normalize=True)
        )

    def report_progress() -> None:
        if progress is not None:
            progress(tally.texts_done, num_texts)

    async def timed_call(channel: Channel, batch: list[str]) -> None:
        began = time.perf_counter()
        try:
            # The deadline is this scope's: the server is sent what is left
            # of it as grpc-timeout, and it ends the call here if need be.
            with trio.fail_after(timeout):
                await call_with_deadline(
                    partial(one, channel, batch), timeout=math.inf, target=address
                )
        except trio.TooSlowError:
            tally.failed(
                len(batch), Failure(StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s")
            )
        except (RpcStatusError, RpcUnavailable, BadResponse) as exc:
            tally.failed(len(batch), Failure.of(exc))
        else:
            tally.succeeded(len(batch), (time.perf_counter() - began) * 1000)
        report_progress()

    async def worker(queue: trio.MemoryReceiveChannel[list[str]]) -> None:
        batch: list[str] | None = None  # taken from the queue, not yet counted
        while True:
            if batch is None:
                batch = take(queue)
                if batch is None:
                    return
            # Connecting shares the first call's deadline: a server that
            # swallows the handshake (or SYNs) fails that call, no more.
            connecting = trio.CancelScope(deadline=trio.current_time() + timeout)
            try:
                with connecting:
                    async with open_channel(
                        host, port, ssl_context=ssl_context, max_message_length=max_message_length
                    ) as channel:
                        connecting.deadline = math.inf
                        while batch is not None:
                            await timed_call(channel, batch)
                            batch = take(queue)
            except RpcUnavailable as exc:
                # Refused, a TLS rejection, or the connection broke under
                # the call in flight: that call fails, the next reconnects.
                failure = Failure.of(exc)
            else:
                if not connecting.cancelled_caught:
                    return
                failure = Failure(
                    StatusCode.DEADLINE_EXCEEDED, f"no connection to {address} within {timeout:g} s"
                )
            if batch is not None:
                tally.failed(len(batch), failure)
                batch = None
                report_progress()

    def take(queue: trio.MemoryReceiveChannel[list[str]]) -> list[str] | None:
        try:
            return queue.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None

    send, receive = trio.open_memory_channel[list[str]](math.inf)
    for batch in batches:
        send.send_nowait(batch)
    send.close()
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, receive.clone())
    receive.close()
    elapsed = time.perf_counter() - began
    calls = tally.successful_calls + tally.failed_calls
    return {
        # bench-client's fields, with its meanings: batch_size is the
        # concurrency in standard mode, texts per call otherwise.
        "mode": mode,
        "instance_name": instance,
        "num_texts": num_texts,
        "batch_size": requested if mode == "standard" else size,
        "num_requests": len(batches),
        "total_duration_secs": round(elapsed, 4),
        "throughput_per_sec": round(tally.successful_texts / elapsed, 2) if elapsed else 0.0,
        "successful": tally.successful_texts,
        "failed": tally.failed_texts,
        # teisup's.
        "endpoint": address,
        "tls": ssl_context is not None,
        "concurrency": concurrency,
        "texts_per_call": size,
        "successful_calls": tally.successful_calls,
        "failed_calls": tally.failed_calls,
        "calls_per_sec": round(calls / elapsed, 2) if elapsed else 0.0,
        "latency_ms": tally.latency_summary(),
        "errors": tally.error_rows(),
    }


def render_table(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for a person to read."""
    lines = [
        f"teisup-bench  {report['mode']} mode  instance {report['instance_name']}  "
        f"at {report.get('endpoint', '?')}{' (TLS)' if report.get('tls') else ''}",
        "",
    ]

    def rows(pairs: Sequence[tuple[str, str]]) -> None:
        width = max(len(label) for label, _ in pairs)
        lines.extend(f"  {label:<{width}}  {value}" for label, value in pairs)

    rows(
        [
            ("texts", f"{report['num_texts']} in {report['num_requests']} calls "
                      f"({report['texts_per_call']} per call, {report['concurrency']} in flight)"),
            ("duration", f"{report['total_duration_secs']:.3f} s"),
            ("throughput", f"{report['throughput_per_sec']:.2f} texts/s, "
                           f"{report['calls_per_sec']:.2f} calls/s"),
            ("successful", f"{report['successful']} texts, {report['successful_calls']} calls"),
            ("failed", f"{report['failed']} texts, {report['failed_calls']} calls"),
        ]
    )  # fmt: skip
    latency = report["latency_ms"]
    names = [name for name, _ in PERCENTILES]
    cells = ["-" if latency[name] is None else f"{latency[name]:.3f}" for name in names]
    widths = [max(len(n), len(c)) for n, c in zip(names, cells, strict=True)]
    lines += [
        "",
        "latency per successful call, ms",
        "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True)),
        "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)),
    ]
    errors = report["errors"]
    if errors:
        code_width = max(len("code"), *(len(e["code"]) for e in errors))
        calls_width = max(len("calls"), *(len(str(e["calls"])) for e in errors))
        lines += [
            "",
            "failed calls by status",
            f"  {'code':<{code_width}}  {'calls':>{calls_width}}  message",
        ]
        lines += [
            f"  {e['code']:<{code_width}}  {e['calls']:>{calls_width}}  {e['message']}"
            for e in errors
        ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teisup-bench",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 when every call succeeded, 1 when any failed, 2 for bad flags.",
    )
    parser.add_argument(
        "-e", "--endpoint", default="http://localhost:9001",
        help="the multiplexer, http://HOST:PORT (plaintext) or https://HOST:PORT (TLS)",
    )  # fmt: skip
    parser.add_argument("-i", "--instance", required=True, help="instance name to target")
    parser.add_argument("-m", "--mode", choices=MODES, default="standard")
    parser.add_argument(
        "-n", "--num-texts", type=int, default=10000, help="texts to embed (default: 10000)"
    )
    parser.add_argument(
        "-b", "--batch-size", type=int, default=100,
        help="standard: calls in flight; arrow and stream: texts per call (default: 100)",
    )  # fmt: skip
    parser.add_argument(
        "-c", "--concurrency", type=int, default=None,
        help="calls in flight, each on its own connection "
             "(default: -b in standard mode, 1 in arrow and stream modes)",
    )  # fmt: skip
    parser.add_argument("--noop", action="store_true", help="arrow: the multiplexer answers itself")
    parser.add_argument("--cert", help="client certificate for mTLS (PEM; with --key)")
    parser.add_argument("--key", help="client key for mTLS (PEM; with --cert)")
    parser.add_argument("--ca", help="CA bundle to trust (PEM; default: the system's)")
    parser.add_argument(
        "--insecure", action="store_true",
        help="https: do not verify the server's certificate (the connection is still TLS)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=60.0,
        help="deadline of each call, connecting included, seconds (default: 60)",
    )  # fmt: skip
    parser.add_argument(
        "--max-message-size-mb", type=int, default=100,
        help="largest message either way, MiB, 1..1023 (default: 100)",
    )  # fmt: skip
    parser.add_argument(
        "--token",
        default=os.environ.get("TEISUP_API_TOKEN"),
        help="API token sent as 'authorization: Bearer' (default: $TEISUP_API_TOKEN)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="json",
        help="json: machine-readable, on stdout (default); table: for people",
    )  # fmt: skip
    return parser


def _tls(args: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=args.ca)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
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


def _usage_error(message: str) -> int:
    print(f"teisup-bench: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = urllib.parse.urlsplit(args.endpoint if "://" in args.endpoint else f"//{args.endpoint}")
    if url.scheme not in ("", "http", "https"):
        return _usage_error(
            f"--endpoint must be http://HOST:PORT or https://HOST:PORT, not {url.scheme}://"
        )
    try:
        host, port = url.hostname or "localhost", url.port or 9001
    except ValueError as exc:  # a port that is not a number, or out of range
        return _usage_error(f"--endpoint {args.endpoint}: {exc}")
    if not 1 <= args.max_message_size_mb <= 1023:
        return _usage_error("--max-message-size-mb must be 1..1023")
    for name in ("num_texts", "batch_size", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _usage_error(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0:
        return _usage_error("--timeout must be > 0")
    if bool(args.cert) != bool(args.key):
        return _usage_error("--cert and --key go together (mTLS needs both)")
    tls_flags = [f"--{n}" for n in ("cert", "key", "ca", "insecure") if getattr(args, n)]
    if url.scheme != "https" and tls_flags:
        # As bench-client: the scheme decides; say what is left unused.
        print(
            f"teisup-bench: {' '.join(tls_flags)} ignored: {args.endpoint} is plaintext "
            "(use https:// for TLS)",
            file=sys.stderr,
        )
    try:
        ssl_context = _tls(args) if url.scheme == "https" else None
    except (OSError, ssl.SSLError) as exc:
        return _usage_error(f"TLS files: {exc}")
    if args.concurrency is not None:
        concurrency = args.concurrency
    else:
        concurrency = args.batch_size if args.mode == "standard" else 1
    run = partial(
        run_bench,
        host,
        port,
        instance=args.instance,
        mode=args.mode,
        num_texts=args.num_texts,
        batch_size=args.batch_size,
        concurrency=concurrency,
        noop=args.noop,
        ssl_context=ssl_context,
        timeout=args.timeout,
        token=args.token,
        max_message_length=args.max_message_size_mb << 20,
        # Only for a person watching: never in a pipe or a log.
        progress=ProgressBar(sys.stderr) if sys.stderr.isatty() else None,
    )
    report = trio.run(run)
    if args.format == "table":
        sys.stdout.write(render_table(report))
    else:
        print(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
