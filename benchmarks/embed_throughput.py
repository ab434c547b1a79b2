#!/usr/bin/env python3
"""Embedded backend throughput against ``SentenceTransformer.encode``, side by side.

    python benchmarks/embed_throughput.py [--seconds 5] [--sizes 1,32,256] [--clients 32]

Starts ``python -m teisup.embedded`` with all-MiniLM-L6-v2 (the packaged
weights), and reports:

* start-up time to the ``Ready`` line and the server's resident memory;
* for each request size N, texts/s through the server (N=1: sequential unary
  Embed calls; N>1: one EmbedStream with N messages in flight, from a grpcio
  client) and texts/s of ``SentenceTransformer.encode(batch, batch_size=N)``
  in this process on the same short sentences, and their ratio.

* with ``--clients C`` (default 32; 0 skips it), C concurrent ``grpc.aio``
  clients on one channel, each calling unary Embed with one short text of its
  own, again and again: texts/s served, against ``SentenceTransformer.encode``
  on the same C texts in batches of C. This is how an embedding server is
  mostly used, and what the batcher must coalesce (target: a ratio >= 0.8).

The two are measured alternately in one run, so both see the same machine
state; while one runs, the other is idle. The issue's target is a ratio of at
least 0.85 at N=32 and N=256.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import MODEL, free_port, sentences  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: object, texts_per_call: int, seconds: float) -> float:
    """Texts per second of ``fn()`` called repeatedly for about ``seconds``."""
    assert callable(fn)
    fn()  # warm
    calls = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls * texts_per_call / elapsed


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_sizes(prometheus: int) -> tuple[float, float]:
    """``(sum, count)`` of the server's ``te_batch_next_size`` histogram."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{prometheus}/metrics") as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("te_batch_next_size_sum", "te_batch_next_size_count")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values.get("te_batch_next_size_sum", 0.0), values.get("te_batch_next_size_count", 0.0)


def concurrent_clients(port: int, texts: list[str], seconds: float) -> tuple[int, float, float]:
    """``(calls, seconds, p50 s)``: each client loops on unary Embed of its text for ``seconds``."""
    import asyncio

    import grpc

    from teisup.proto.tei.v1 import tei_pb2

    async def run() -> tuple[int, float, float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            embed = channel.unary_unary(
                "/tei.v1.Embed/Embed",
                request_serializer=tei_pb2.EmbedRequest.SerializeToString,
                response_deserializer=tei_pb2.EmbedResponse.FromString,
            )
            requests = [tei_pb2.EmbedRequest(inputs=t) for t in texts]
            await asyncio.gather(*(embed(r) for r in requests))  # warm
            latencies: list[float] = []
            stop_at = time.perf_counter() + seconds

            async def client(request: tei_pb2.EmbedRequest) -> None:
                while (sent := time.perf_counter()) < stop_at:
                    await embed(request)
                    latencies.append(time.perf_counter() - sent)

            start = time.perf_counter()
            await asyncio.gather(*(client(r) for r in requests))
            elapsed = time.perf_counter() - start
            latencies.sort()
            return len(latencies), elapsed, latencies[len(latencies) // 2]

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--sizes", default="1,32,256", help='texts per request ("": none)')
    parser.add_argument(
        "--clients", type=int, default=32, help="concurrent single-text unary clients (0: skip)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds the --seconds are split into"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    import grpc

    from teisup.embedded.models import resolve_model
    from teisup.proto.tei.v1 import tei_pb2

    port, prometheus = free_port(), free_port()
    argv = [sys.executable, "-m", "teisup.embedded", "--model-id", MODEL, "--port", str(port)]
    argv += ["--hostname", "127.0.0.1", "--prometheus-port", str(prometheus)]
    argv += ["--max-concurrent-requests", "1024"]
    started = time.perf_counter()
    server = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert server.stdout is not None
    for line in server.stdout:
        if line.rstrip().endswith("Ready"):
            break
    else:
        print("server exited before Ready", file=sys.stderr)
        return 1
    ready_s = time.perf_counter() - started
    rss_ready = rss_mib(server.pid)

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model(MODEL).path), device="cpu")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    embed = channel.unary_unary(
        "/tei.v1.Embed/Embed",
        request_serializer=tei_pb2.EmbedRequest.SerializeToString,
        response_deserializer=tei_pb2.EmbedResponse.FromString,
    )
    embed_stream = channel.stream_stream(
        "/tei.v1.Embed/EmbedStream",
        request_serializer=tei_pb2.EmbedRequest.SerializeToString,
        response_deserializer=tei_pb2.EmbedResponse.FromString,
    )
    try:
        print(f"start-up to Ready: {ready_s:.2f} s; server RSS at Ready: {rss_ready:.0f} MiB")
        print(f"{'texts/request':>13} {'server t/s':>11} {'direct t/s':>11} {'ratio':>6}")
        for n in sizes:
            batch = sentences(n)
            requests = [tei_pb2.EmbedRequest(inputs=t) for t in batch]

            def direct(batch: list[str] = batch, n: int = n) -> None:
                model.encode(batch, batch_size=n)

            def served(requests: list[tei_pb2.EmbedRequest] = requests, n: int = n) -> None:
                if n == 1:
                    embed(requests[0])
                else:
                    answers = list(embed_stream(iter(requests)))
                    assert len(answers) == n

            direct_tps = timed(direct, n, args.seconds)
            server_tps = timed(served, n, args.seconds)
            print(
                f"{n:>13} {server_tps:>11.1f} {direct_tps:>11.1f} {server_tps / direct_tps:>6.2f}"
            )
        if args.clients > 0:
            # Alternating rounds (direct, served, served, direct, ...), so that
            # both sides see the same share of whatever else the machine runs.
            c = args.clients
            texts = sentences(c, offset=1000)
            direct_texts = direct_s = direct_cpu = served_calls = served_s = 0.0
            p50s: list[float] = []
            cpu = cpu_seconds(server.pid)
            batches = batch_sizes(prometheus)
            for r in range(args.rounds):
                share = args.seconds / args.rounds
                for side in ("direct", "served") if r % 2 == 0 else ("served", "direct"):
                    if side == "direct":
                        model.encode(texts, batch_size=c)  # warm
                        begin, cpu_begin = time.perf_counter(), time.process_time()
                        while (took := time.perf_counter() - begin) < share:
                            model.encode(texts, batch_size=c)
                            direct_texts += c
                        direct_s += took
                        direct_cpu += time.process_time() - cpu_begin
                    else:
                        calls, took, p50 = concurrent_clients(port, texts, share)
                        served_calls += calls
                        served_s += took
                        p50s.append(p50)
            cpu_per_text = (cpu_seconds(server.pid) - cpu) / served_calls
            after = batch_sizes(prometheus)
            mean_batch = (after[0] - batches[0]) / max(after[1] - batches[1], 1.0)
            server_tps, direct_tps = served_calls / served_s, direct_texts / direct_s
            print(
                f"{c} concurrent unary clients, 1 text each: server {server_tps:.1f} t/s "
                f"(p50 {sorted(p50s)[len(p50s) // 2] * 1e3:.1f} ms, mean batch {mean_batch:.1f}, "
                f"server CPU {cpu_per_text * 1e3:.2f} ms/text), "
                f"encode(batch_size={c}) {direct_tps:.1f} t/s "
                f"(CPU {direct_cpu / direct_texts * 1e3:.2f} ms/text), "
                f"ratio {server_tps / direct_tps:.2f}"
            )
        print(f"server RSS after the runs: {rss_mib(server.pid):.0f} MiB")
    finally:
        channel.close()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server exit status after SIGTERM: {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
