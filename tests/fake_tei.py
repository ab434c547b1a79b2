#!/usr/bin/env python3
"""A stand-in for TEI's gRPC router (``text-embeddings-router``, reporting 1.9.3), for tests.

Run it as TEI would be run::

    python tests/fake_tei.py --model-id BAAI/bge-small-en-v1.5 --port 8080 \\
        --hostname 127.0.0.1 --prometheus-port 9100 --json-output

It takes TEI's command line: every 1.8.3 flag is accepted, the ones below are
used and the rest are ignored. An unknown flag, a missing value or both
``--default-prompt`` and ``--default-prompt-name`` is a usage error: usage on
stderr, exit 2, as clap does. TEI's environment variables (``PORT``,
``HOSTNAME``, ...) are *not* read.

What it does, in TEI's order:

1. logs an ``Args { ... }`` line, then start-up lines, to stdout;
2. after ``FAKE_TEI_START_DELAY`` seconds (the download and warm-up), binds
   ``127.0.0.1:--port`` (always loopback, whatever ``--hostname`` says) and logs
   ``Ready``. Unlike real TEI, which logs ``Ready`` just before binding, the
   socket is listening by the time ``Ready`` is printed, so a client may
   connect as soon as it reads that line;
3. serves ``grpc.health.v1.Health`` (``""``, ``tei.v1.Info``, ``tei.v1.Embed``
   and ``tei.v1.Tokenize`` SERVING; ``tei.v1.Predict`` and ``tei.v1.Rerank``
   NOT_SERVING, as for an embedding model) and ``tei.v1.Info`` (version
   "1.9.3", ``--model-id``, ``--revision`` as ``model_sha``, ``--dtype`` or
   "float32", max_input_length 512 and the limits from the flags). No other TEI
   service (but see ``FAKE_TEI_RECORD``), no metrics listener on
   ``--prometheus-port``, no API-key check;
4. on SIGTERM or SIGINT logs ``signal received, starting graceful shutdown``
   and exits 0. As in TEI, no handler is installed before the server starts:
   a signal during the start delay kills the process by the signal.

Logs are one line each on stdout, flushed at once: with ``--json-output`` a
JSON object with ``timestamp``, ``level``, ``message``, ``target``, ``filename``
and ``line_number`` keys, otherwise TEI's text layout without colours
(``2025-01-01T00:00:00.000000Z  INFO target: file:line: message``). Fatal
errors go to stderr as ``Error: ...``. A taken port is such an error: exit 1.

Behaviour knobs, read from the environment:

``FAKE_TEI_START_DELAY`` (seconds, default 0)
    Wait this long before binding and ``Ready``.
``FAKE_TEI_FAIL_START`` (any non-empty value)
    After the start delay, print ``Error: Could not download model
    artifacts ...`` to stderr and exit 1 (or ``FAKE_TEI_EXIT_CODE``), never
    ``Ready``: what a bad ``--model-id`` does.
``FAKE_TEI_CRASH_AFTER`` (seconds)
    This long after ``Ready``, print an ``Error:`` line to stderr and exit with
    ``FAKE_TEI_EXIT_CODE``.
``FAKE_TEI_EXIT_CODE`` (integer, default 1)
    The exit status for the two knobs above.
``FAKE_TEI_IGNORE_SIGTERM=1``
    Ignore SIGTERM (SIGINT still stops it; SIGKILL always does).
``FAKE_TEI_GRANDCHILD=1``
    At start, spawn ``sleep 1000`` in the fake's own process group, with its
    stdio on /dev/null, and log ``grandchild <pid>`` (a JSON line with
    ``--json-output``, like every other line). Nothing ever reaps or kills it.
``FAKE_TEI_DETACHED_GRANDCHILD=1``
    At start, spawn ``sleep 1000`` that has left the fake's process group: a
    double fork and ``setsid``, as a daemon does, so a process-group kill
    cannot reach it and its parent is gone (it is orphaned). Logs
    ``detached grandchild <pid>``.
``FAKE_TEI_READY_EARLY`` (seconds)
    Log ``Ready`` this long *before* binding, as real TEI's gRPC build does
    (it logs ``Ready`` just before tonic binds).
``FAKE_TEI_HANG`` (seconds)
    This long after ``Ready``, stop answering: every gRPC call (health
    included) waits forever, while connections are still accepted and SIGTERM
    still works. (SIGSTOP gives a harder hang: not even signals are handled.)

``FAKE_TEI_RECORD`` (a file path)
    Also serve ``tei.v1.Embed``'s ``Embed`` and ``EmbedStream`` as a
    recording stand-in: append one JSON line per request received to this
    file, ``{"inputs": ..., "normalize": true|false|null, "truncate": ...}``
    (``null``: the field was not set, which proto3 ``optional`` lets a server
    see), and answer ``[3.0, 4.0]`` (norm 5), or ``[0.6, 0.8]`` when
    normalizing, with TEI 1.9's rule that an unset ``normalize`` means true.

Bad knob values are a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NoReturn

import trio

if find_spec("teisup") is None:  # run from a source tree without teisup installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from teisup.proto.grpc.health.v1 import health_pb2
from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.rpc import HealthServicer, Server, ServingStatus

VERSION = "1.9.3"
BIND_HOST = "127.0.0.1"

# Where real TEI logs each line from (target, file, line), for faithful log lines.
MAIN = ("text_embeddings_router", "router/src/main.rs", 203)
LIB = ("text_embeddings_router", "router/src/lib.rs", 264)
WARMUP = ("text_embeddings_router", "router/src/lib.rs", 282)
GRPC_START = ("text_embeddings_router::grpc::server", "router/src/grpc/server.rs", 1510)
GRPC_READY = ("text_embeddings_router::grpc::server", "router/src/grpc/server.rs", 1511)
SHUTDOWN = ("text_embeddings_router::shutdown", "router/src/shutdown.rs", 31)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # argparse, like clap, prints usage and exits 2 on any usage error.
    p = argparse.ArgumentParser(
        prog="text-embeddings-router",
        description="Text Embedding Webserver (fake, for teisup's tests)",
        allow_abbrev=False,  # clap does not guess long flags from prefixes
    )
    p.add_argument("-V", "--version", action="version", version=f"text-embeddings-router {VERSION}")
    p.add_argument("--model-id", default="BAAI/bge-large-en-v1.5")
    p.add_argument("--revision")
    p.add_argument("--tokenization-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", choices=["float16", "float32"])
    p.add_argument("--pooling", choices=["cls", "mean", "splade", "last-token"])
    p.add_argument("--max-concurrent-requests", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch-requests", type=int)
    p.add_argument("--max-client-batch-size", type=int, default=32)
    p.add_argument("--auto-truncate", action="store_true")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--default-prompt-name")
    prompt.add_argument("--default-prompt")
    p.add_argument("--dense-path")
    p.add_argument("--hf-api-token")
    p.add_argument("--hf-token")
    p.add_argument("--hostname", default="0.0.0.0")
    p.add_argument("-p", "--port", type=int, default=3000)
    p.add_argument("--uds-path", default="/tmp/text-embeddings-inference-server")
    p.add_argument("--huggingface-hub-cache")
    p.add_argument("--payload-limit", type=int, default=2_000_000)
    p.add_argument("--api-key")
    p.add_argument("--json-output", action="store_true")
    p.add_argument("--disable-spans", action="store_true")
    p.add_argument("--otlp-endpoint")
    p.add_argument("--otlp-service-name", default="text-embeddings-inference.server")
    p.add_argument("--prometheus-port", type=int, default=9000)
    p.add_argument("--cors-allow-origin", action="append")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Knobs:
    """The FAKE_TEI_* environment variables, parsed."""

    start_delay: float = 0.0
    fail_start: bool = False
    crash_after: float | None = None
    exit_code: int = 1
    ignore_sigterm: bool = False
    grandchild: bool = False
    detached_grandchild: bool = False
    hang_after: float | None = None
    ready_early: float | None = None
    record: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Knobs:
        def seconds(name: str) -> float | None:
            raw = env.get(name, "")
            if not raw:
                return None
            try:
                value = float(raw)
            except ValueError:
                usage_error(f"{name} must be a number of seconds, not {raw!r}")
            if value < 0:
                usage_error(f"{name} must not be negative")
            return value

        code = env.get("FAKE_TEI_EXIT_CODE", "")
        if code and not code.lstrip("-").isdigit():
            usage_error(f"FAKE_TEI_EXIT_CODE must be an integer, not {code!r}")
        return cls(
            start_delay=seconds("FAKE_TEI_START_DELAY") or 0.0,
            fail_start=bool(env.get("FAKE_TEI_FAIL_START")),
            crash_after=seconds("FAKE_TEI_CRASH_AFTER"),
            exit_code=int(code) if code else 1,
            ignore_sigterm=env.get("FAKE_TEI_IGNORE_SIGTERM", "") not in ("", "0"),
            grandchild=env.get("FAKE_TEI_GRANDCHILD", "") not in ("", "0"),
            detached_grandchild=env.get("FAKE_TEI_DETACHED_GRANDCHILD", "") not in ("", "0"),
            hang_after=seconds("FAKE_TEI_HANG"),
            record=env.get("FAKE_TEI_RECORD") or None,
            ready_early=seconds("FAKE_TEI_READY_EARLY"),
        )


def usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# --------------------------------------------------------------------------- logging


class Log:
    """TEI-shaped log lines on stdout, flushed line by line (stdout is a pipe)."""

    def __init__(self, json_output: bool) -> None:
        self.json_output = json_output

    def info(self, where: tuple[str, str, int], message: str) -> None:
        target, filename, line = where
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if self.json_output:
            record = {
                "timestamp": now,
                "level": "INFO",
                "message": message,
                "target": target,
                "filename": filename,
                "line_number": line,
            }
            text = json.dumps(record, separators=(",", ":"))
        else:
            text = f"{now}  INFO {target}: {filename}:{line}: {message}"
        print(text, flush=True)


def fatal(context: str, cause: str) -> None:
    """An anyhow-style fatal error on stderr, as TEI's main prints one."""
    print(f"Error: {context}\n\nCaused by:\n    {cause}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- services


class FakeInfo(tei_grpc.InfoServicer):
    def __init__(self, response: tei_pb2.InfoResponse, hung: trio.Event) -> None:
        self._response = response
        self._hung = hung

    async def Info(self, input_message: tei_pb2.InfoRequest) -> tei_pb2.InfoResponse:
        if self._hung.is_set():
            await trio.sleep_forever()
        return self._response


class FakeHealth(HealthServicer):
    def __init__(self, hung: trio.Event) -> None:
        super().__init__(
            {
                "": ServingStatus.SERVING,
                "tei.v1.Info": ServingStatus.SERVING,
                "tei.v1.Tokenize": ServingStatus.SERVING,
                "tei.v1.Embed": ServingStatus.SERVING,
                "tei.v1.Predict": ServingStatus.NOT_SERVING,
                "tei.v1.Rerank": ServingStatus.NOT_SERVING,
            }
        )
        self._hung = hung

    async def Check(
        self, input_message: health_pb2.HealthCheckRequest
    ) -> health_pb2.HealthCheckResponse:
        if self._hung.is_set():
            await trio.sleep_forever()
        return await super().Check(input_message)


class RecordingEmbed(tei_grpc.EmbedServicer):
    """``Embed`` / ``EmbedStream`` that write down what arrived (``FAKE_TEI_RECORD``)."""

    RAW = (3.0, 4.0)

    def __init__(self, path: str) -> None:
        self._path = path

    def _answer(self, request: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        normalize = request.normalize if request.HasField("normalize") else None
        entry = {"inputs": request.inputs, "normalize": normalize, "truncate": request.truncate}
        with open(self._path, "a") as out:
            out.write(json.dumps(entry) + "\n")
        vector = [v / 5.0 for v in self.RAW] if normalize is not False else list(self.RAW)
        return tei_pb2.EmbedResponse(
            embeddings=vector, metadata=tei_pb2.Metadata(compute_tokens=len(request.inputs))
        )

    async def Embed(self, input_message: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        return self._answer(input_message)

    async def EmbedStream(self, input_messages: Any) -> Any:
        async for request in input_messages:
            yield self._answer(request)


def info_response(args: argparse.Namespace) -> tei_pb2.InfoResponse:
    fields: dict[str, Any] = {
        "version": VERSION,
        "model_id": args.model_id,
        "model_dtype": args.dtype or "float32",
        "model_type": tei_pb2.MODEL_TYPE_EMBEDDING,
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_input_length": 512,
        "max_batch_tokens": args.max_batch_tokens,
        "max_client_batch_size": args.max_client_batch_size,
        "tokenization_workers": args.tokenization_workers,
    }
    if args.revision is not None:
        fields["model_sha"] = args.revision
    if args.max_batch_requests is not None:
        fields["max_batch_requests"] = args.max_batch_requests
    return tei_pb2.InfoResponse(**fields)


# --------------------------------------------------------------------------- main


def args_line(args: argparse.Namespace) -> str:
    """The ``Args { ... }`` line TEI logs first, in Rust's Debug notation."""

    def debug(value: object) -> str:
        if value is None:
            return "None"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ", ".join(debug(v) for v in value) + "]"
        return str(value)

    shown = ", ".join(f"{name}: {debug(value)}" for name, value in vars(args).items())
    return f"Args {{ {shown} }}"


def spawn_grandchild() -> int:
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
        # posix_spawn keeps our process group; no Popen object, so nothing
        # warns at exit that the child is still running (that is the point).
        return os.posix_spawnp("sleep", ["sleep", "1000"], os.environ, file_actions=actions)
    finally:
        os.close(devnull)


#: Forks; the child starts a new session, tells its pid and becomes ``sleep``
#: while its parent has exited already.
DETACH = """
import os
if os.fork():
    os._exit(0)
os.setsid()
print(os.getpid(), flush=True)
devnull = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(devnull, fd)
os.execvp("sleep", ["sleep", "1000"])
"""


def spawn_detached_grandchild() -> int:
    out = subprocess.run(
        [sys.executable, "-c", DETACH],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return int(out.stdout)


async def serve(args: argparse.Namespace, knobs: Knobs, log: Log) -> int:
    log.info(MAIN, args_line(args))
    if knobs.grandchild:
        log.info(MAIN, f"grandchild {spawn_grandchild()}")
    if knobs.detached_grandchild:
        log.info(MAIN, f"detached grandchild {spawn_detached_grandchild()}")
    log.info(LIB, "Starting model backend")
    await trio.sleep(knobs.start_delay)
    if knobs.fail_start:
        fatal(
            "Could not download model artifacts",
            f"request error: {args.model_id} is not a valid model id (FAKE_TEI_FAIL_START)",
        )
        return knobs.exit_code
    log.info(WARMUP, "Warming up model")

    hung = trio.Event()
    server = Server(args.port, host=BIND_HOST)
    server.add_service(FakeHealth(hung))
    server.add_service(FakeInfo(info_response(args), hung))
    if knobs.record is not None:
        server.add_service(RecordingEmbed(knobs.record))
    stop_signals = [signal.SIGINT] if knobs.ignore_sigterm else [signal.SIGTERM, signal.SIGINT]
    # Installed before Ready, so a signal sent by someone who saw Ready is handled.
    with trio.open_signal_receiver(*stop_signals) as signals:
        async with trio.open_nursery() as nursery:
            if knobs.ready_early is not None:
                # As real TEI does: Ready is logged before the socket is bound.
                log.info(GRPC_READY, "Ready")
                await trio.sleep(knobs.ready_early)
            try:
                await nursery.start(server.serve_async)
            except OSError as exc:
                fatal(f"Could not bind TCP Listener on {BIND_HOST}:{args.port}", str(exc))
                return 1
            log.info(GRPC_START, f"Starting gRPC server: {BIND_HOST}:{server.port}")
            if knobs.ready_early is None:
                log.info(GRPC_READY, "Ready")

            async def crash(after: float) -> None:
                await trio.sleep(after)
                fatal("fake crash", f"FAKE_TEI_CRASH_AFTER={after:g} elapsed")
                # A crash ends the process at once, as a panicking TEI does: the
                # socket closes with the exit, never long before it (an orderly
                # teardown on a loaded machine would read as unhealthy first).
                sys.stdout.flush()
                os._exit(knobs.exit_code)

            async def hang(after: float) -> None:
                await trio.sleep(after)
                hung.set()

            if knobs.crash_after is not None:
                nursery.start_soon(crash, knobs.crash_after)
            if knobs.hang_after is not None:
                nursery.start_soon(hang, knobs.hang_after)
            async for _ in signals:
                log.info(SHUTDOWN, "signal received, starting graceful shutdown")
                break
            nursery.cancel_scope.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    knobs = Knobs.from_env(dict(os.environ))
    # TEI has no signal handler until it serves: until then SIGINT and SIGTERM
    # kill it outright. Python's SIGINT default (KeyboardInterrupt) would not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if knobs.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return trio.run(serve, args, knobs, Log(args.json_output))


if __name__ == "__main__":
    sys.exit(main())
