#!/usr/bin/env python3
"""Embedded backend throughput against ``SentenceTransformer.encode``, side by side.

    python benchmarks/embed_throughput.py [--seconds 5] [--sizes 1,32,256]

Starts ``python -m teisup.embedded`` with all-MiniLM-L6-v2 (the packaged
weights), and reports:

* start-up time to the ``Ready`` line and the server's resident memory;
* for each request size N, texts/s through the server (N=1: sequential unary
  Embed calls; N>1: one EmbedStream with N messages in flight, from a grpcio
  client) and texts/s of ``SentenceTransformer.encode(batch, batch_size=N)``
  in this process on the same short sentences, and their ratio.

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--sizes", default="1,32,256", help="texts per request")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

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
        print(f"server RSS after the runs: {rss_mib(server.pid):.0f} MiB")
    finally:
        channel.close()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server exit status after SIGTERM: {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
