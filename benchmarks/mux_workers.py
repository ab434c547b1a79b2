"""The multiplexer's ceiling with 1 and with N worker processes, side by side in one run.

    python benchmarks/mux_workers.py [--workers 2] [--seconds 5] [--rounds 2]

Starts a real ``teisup`` (no instance: the call measured is one the
multiplexer answers itself, ``EmbedArrow`` with ``noop``, 32 texts) with
``--grpc-workers 1``, then with ``--grpc-workers N``, alternating for
``--rounds``, and drives each with ``h2load`` (nghttp2-client: a gRPC body is
the 5-byte prefix plus the message), whose client costs almost nothing. Prints
requests/s per run, the median per setting, and the ratio N / 1, with the
load average so a figure from a busy machine reads as one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import free_port, sentences
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2

PATH = "/tei_multiplexer.v1.TeiMultiplexer/EmbedArrow"
RATE = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
DONE = re.compile(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded")


def noop_body(rows: int = 32) -> bytes:
    """One gRPC message (prefix and all): EmbedArrow, ``noop``, ``rows`` short texts."""
    sink = pa.BufferOutputStream()
    table = pa.table({"text": pa.array(sentences(rows), pa.utf8())})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    request = mux_pb2.EmbedArrowRequest(
        target=mux_pb2.Target(instance_name="bench"),
        arrow_ipc=sink.getvalue().to_pybytes(),
        noop=True,
    )
    payload = request.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


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


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its live descendants."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    family, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return sum(ticks.get(pid, 0) for pid in family) / os.sysconf("SC_CLK_TCK")


def h2load(port: int, body: Path, seconds: float, clients: int, streams: int) -> float:
    argv = [
        "h2load", "-D", f"{seconds:g}", "-d", str(body), "-c", str(clients), "-m", str(streams),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"http://127.0.0.1:{port}{PATH}",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    rate, done = RATE.search(out), DONE.search(out)
    if rate is None or done is None or int(done.group(2)) == 0:
        raise RuntimeError(f"h2load said:\n{out[-2000:]}")
    return float(rate.group(1))


def measure(
    workers: int, args: argparse.Namespace, body: Path, directory: Path
) -> tuple[float, float]:
    """(requests/s, teisup's CPU microseconds per request: manager and workers)."""
    proc, port = start_teisup(workers, directory)
    try:
        h2load(port, body, 1.0, args.clients, args.streams)  # warm-up, and every worker bound
        cpu = tree_cpu(proc.pid)
        rate = h2load(port, body, args.seconds, args.clients, args.streams)
        used = tree_cpu(proc.pid) - cpu
        return rate, used / (rate * args.seconds) * 1e6
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
        body = directory / "noop.bin"
        body.write_bytes(noop_body())
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
