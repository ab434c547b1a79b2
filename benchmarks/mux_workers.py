"""The multiplexer's ceiling with 1 and with N worker processes, side by side in one run.

    python benchmarks/mux_workers.py [--workers 2] [--seconds 5] [--rounds 2]

Starts a real ``teisup`` (no instance: the call measured is one the
multiplexer answers itself, ``EmbedArrow`` with ``noop``, 32 texts) with
``--grpc-workers 1``, then with ``--grpc-workers N``, alternating for
``--rounds``, and drives each with ``h2load`` (nghttp2-client: a gRPC body is
the 5-byte prefix plus the message), whose client costs almost nothing, through
`benchmarks/mux_compare.py`'s h2load driver. Prints
requests/s per run, the median per setting, and the ratio N / 1, with the
load average so a figure from a busy machine reads as one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import free_port, sentences
from benchmarks.mux_compare import MUX, Meter, grpc_body, h2load
from teisup.bench import arrow_ipc
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2


def noop_body(rows: int = 32) -> bytes:
    """One gRPC message (prefix and all): EmbedArrow, ``noop``, ``rows`` short texts."""
    request = mux_pb2.EmbedArrowRequest(
        target=mux_pb2.Target(instance_name="bench"),
        arrow_ipc=arrow_ipc(sentences(rows)),
        noop=True,
    )
    return grpc_body(request)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"teisup exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def wait_workers(api: int, workers: int, timeout: float = 60.0) -> None:
    """Until every ``grpc-worker-N`` child is running (h2load connects only once)."""
    if workers == 1:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/supervisor/tree") as answer:
            tree = json.load(answer)
        states = [c["state"] for c in tree["children"] if c["id"].startswith("grpc-worker-")]
        if states.count("running") == workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"not every gRPC worker runs after {timeout} s")


def start_teisup(workers: int, directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    api, grpc = free_port(), free_port()
    env = {**os.environ, "TEISUP_DEFAULT_INSTANCE": "false", "TEISUP_BIND_HOST": "127.0.0.1"}
    env.pop("TEISUP_API_TOKEN", None)
    argv = [
        sys.executable, "-m", "teisup", "--api-port", str(api), "--grpc-port", str(grpc),
        "--grpc-workers", str(workers), "--state-file", str(directory / f"state-{workers}.toml"),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    wait_port(api, proc)
    wait_port(grpc, proc)
    wait_workers(api, workers)
    return proc, grpc


def measure(
    workers: int, args: argparse.Namespace, body: bytes, directory: Path
) -> tuple[float, float]:
    """(requests/s, teisup's CPU microseconds per request: manager and workers)."""
    proc, port = start_teisup(workers, directory)
    url = f"http://127.0.0.1:{port}{MUX}/EmbedArrow"
    load = partial(h2load, url, body, clients=args.clients, streams=args.streams, grpc=True)
    try:
        load(seconds=1.0, meter=Meter("nobody", None))  # warm-up
        rate, cpu, _ = load(seconds=args.seconds, meter=Meter("teisup", proc.pid))
        return rate, cpu
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="N, compared with 1")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16, help="h2load connections")
    parser.add_argument("--streams", type=int, default=16, help="h2load streams per connection")
    args = parser.parse_args()
    rates: dict[int, list[float]] = {1: [], args.workers: []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        body = noop_body()
        print(
            f"EmbedArrow noop (32 texts), h2load -c {args.clients} -m {args.streams}, "
            f"{args.seconds:g} s a run; load average {os.getloadavg()[0]:.2f}, "
            f"{len(os.sched_getaffinity(0))} CPUs"
        )
        for round_ in range(args.rounds):
            for workers in rates:
                rate, cpu = measure(workers, args, body, directory)
                rates[workers].append(rate)
                print(
                    f"  round {round_ + 1}  grpc_workers={workers}: {rate:10.1f} req/s"
                    f"  {cpu:8.0f} CPU us/req (teisup, all processes)"
                )
    one, many = (statistics.median(rates[w]) for w in rates)
    print(f"median  grpc_workers=1: {one:10.1f} req/s")
    print(f"median  grpc_workers={args.workers}: {many:10.1f} req/s")
    print(f"ratio   grpc_workers={args.workers} / grpc_workers=1: {many / one:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
