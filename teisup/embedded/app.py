"""Start-up, serving and shutdown of the embedded backend, in TEI's order.

1. parse the command line (exit 2 on a usage error) and log ``Args { ... }``;
2. resolve the model offline and load it (exit 1, ``Error: ...`` on stderr,
   if it cannot be found or loaded), check ``max_input_length`` against
   ``--max-batch-tokens``, warm up;
3. bind the Prometheus exporter and the gRPC port (exit 1 if either is
   taken), mark the model's services SERVING and log ``Ready``. Unlike TEI,
   which logs ``Ready`` just before binding, the socket is listening by the
   time ``Ready`` is printed, so a client may connect as soon as it reads it;
4. on SIGTERM or SIGINT, log ``signal received, starting graceful shutdown``,
   refuse new calls, finish the in-flight ones, exit 0.

As in TEI, no signal handler is installed before serving: a SIGTERM during
the model load kills the process outright.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import trio

from .cli import Settings, parse_settings
from .models import ModelNotFound, resolve_model

__all__ = ["Serving", "TeiLog", "main", "serve"]

# Where TEI logs each line from (target, file, line), so log readers see TEI's lines.
MAIN = ("text_embeddings_router", "router/src/main.rs", 203)
MAX_TOKENS = ("text_embeddings_router", "router/src/lib.rs", 216)
BACKEND = ("text_embeddings_router", "router/src/lib.rs", 264)
WARMUP = ("text_embeddings_router", "router/src/lib.rs", 282)
PROMETHEUS = ("text_embeddings_router::grpc::server", "router/src/grpc/server.rs", 1377)
GRPC_START = ("text_embeddings_router::grpc::server", "router/src/grpc/server.rs", 1510)
GRPC_READY = ("text_embeddings_router::grpc::server", "router/src/grpc/server.rs", 1511)
SHUTDOWN = ("text_embeddings_router::shutdown", "router/src/shutdown.rs", 31)


@dataclass(frozen=True)
class Serving:
    """What `serve` reports once it listens (for in-process use and tests)."""

    port: int
    prometheus_port: int
    batcher: Any
    """The `Batcher`: its ``permits`` are the ``--max-concurrent-requests`` semaphore."""


class TeiLog:
    """TEI-shaped log lines on stdout, flushed at once (stdout is usually a pipe).

    With ``json_output``: one JSON object a line with ``timestamp``, ``level``,
    ``message``, ``target``, ``filename`` and ``line_number``, in that order;
    otherwise TEI's text layout without colours.
    """

    def __init__(self, json_output: bool) -> None:
        self.json_output = json_output

    def line(self, level: str, where: tuple[str, str, int], message: str) -> None:
        """Print one log line."""
        target, filename, number = where
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if self.json_output:
            record = {
                "timestamp": now,
                "level": level,
                "message": message,
                "target": target,
                "filename": filename,
                "line_number": number,
            }
            text = json.dumps(record, separators=(",", ":"))
        else:
            text = f"{now}  {level:>5} {target}: {filename}:{number}: {message}"
        print(text, flush=True)

    def info(self, where: tuple[str, str, int], message: str) -> None:
        """Print an INFO line."""
        self.line("INFO", where, message)

    def warn(self, where: tuple[str, str, int], message: str) -> None:
        """Print a WARN line."""
        self.line("WARN", where, message)


class _WarningsToTeiLog(logging.Handler):
    """Python warnings (ours and the libraries') as TEI WARN lines."""

    def __init__(self, log: TeiLog) -> None:
        super().__init__(logging.WARNING)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        where = (record.name, record.pathname.rsplit("/", 1)[-1], record.lineno)
        self._log.line(record.levelname.replace("WARNING", "WARN"), where, record.getMessage())


def fatal(context: str, cause: str) -> None:
    """An anyhow-style fatal error on stderr, as TEI's ``main`` prints one."""
    print(f"Error: {context}\n\nCaused by:\n    {cause}", file=sys.stderr, flush=True)


def _args_line(settings: Settings) -> str:
    def debug(value: object) -> str:
        if value is None:
            return "None"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, tuple | list):
            return "[" + ", ".join(debug(v) for v in value) + "]"
        return str(value)

    fields = asdict(settings)
    for secret in ("api_key", "hf_token", "hf_api_token"):
        if fields.get(secret) is not None:
            fields[secret] = 'Some("***")'
    shown = ", ".join(f"{name}: {debug(value)}" for name, value in fields.items())
    return f"Args {{ {shown} }}"


def _warm_up(engine: Any) -> None:
    """One forward pass of a max-length input and one of a short batch.

    TEI's warm-up is one pass of ``--max-batch-tokens`` tokens; on a CPU that
    takes many seconds for nothing but a memory check, so this warms the code
    paths (and allocator) with the longest single input instead.
    """
    from .engine import INFERENCE_THREAD, Encoded

    longest = engine.max_input_length
    ids = [engine.tokenizer.token_to_id("[CLS]") or 0] * longest
    short = engine.encode("warm up")
    # On the thread that will run every pass (see InferenceThread), not here.
    INFERENCE_THREAD.call(
        lambda: engine.forward([Encoded(ids, [0] * longest, longest)], want_tokens=True)
    )
    INFERENCE_THREAD.call(lambda: engine.forward([short] * 8))


async def serve(
    settings: Settings,
    engine: Any,
    log: TeiLog,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Bind, log ``Ready``, serve until SIGTERM/SIGINT, drain; return the exit code.

    ``task_status`` gets a `Serving` once both ports listen.
    With ``stop``, that event ends serving instead of a signal (in-process use).
    """
    from teisup.rpc import ServingStatus

    from .batcher import Batcher
    from .metrics import Metrics, serve_metrics
    from .server import tei_server
    from .service import TEI_SERVICES, TeiHealth, TeiServices, model_services

    buckets = [float(2**i) for i in range(engine.max_input_length.bit_length())]
    metrics = Metrics(input_length_buckets=[*buckets, float(engine.max_input_length)])
    health = TeiHealth()
    serving = model_services(engine.kind)

    def on_health(ok: bool) -> None:
        # A failed batch flips the model's services to NOT_SERVING until the next success.
        for service in serving:
            health.set_status(service, ServingStatus.SERVING if ok else ServingStatus.NOT_SERVING)

    batcher = Batcher(
        engine,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_requests=settings.max_batch_requests,
        max_concurrent_requests=settings.max_concurrent_requests,
        metrics=metrics,
        on_health=on_health,
    )
    try:
        services = TeiServices(engine, batcher, settings, metrics)
    except ValueError as exc:
        fatal("Could not create the router", str(exc))
        return 1
    server = tei_server(
        settings.port,
        host=settings.hostname,
        services=[*services.services(), health],
        api_key=settings.api_key,
        protected=TEI_SERVICES,
    )

    exit_code = 0
    with contextlib.ExitStack() as stack:
        # Installed before Ready, so a signal sent by someone who saw Ready is handled.
        signals = (
            stack.enter_context(trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
            if stop is None
            else None
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            host = settings.hostname
            try:
                prometheus = await nursery.start(
                    serve_metrics, metrics, host, settings.prometheus_port
                )
            except OSError as exc:
                fatal(
                    "failed to build prometheus recorder", f"failed to create HTTP listener: {exc}"
                )
                nursery.cancel_scope.cancel()
                return 1
            log.info(PROMETHEUS, f"Serving Prometheus metrics: {host}:{prometheus}")
            try:
                port = await nursery.start(server.serve_async)
            except OSError as exc:
                fatal(f"Could not bind TCP Listener on {host}:{settings.port}", str(exc))
                nursery.cancel_scope.cancel()
                return 1
            on_health(True)
            log.info(GRPC_START, f"Starting gRPC server: {host}:{port}")
            log.info(GRPC_READY, "Ready")
            task_status.started(Serving(port, prometheus, batcher))
            if signals is None:
                assert stop is not None
                await stop.wait()
            else:
                async for _ in signals:
                    break
            log.info(SHUTDOWN, "signal received, starting graceful shutdown")
            # tonic drains with no timeout; the supervisor's grace + SIGKILL bound it.
            await server.drain()
            nursery.cancel_scope.cancel()
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the embedded backend; return the process exit status (0, 1; 2 exits itself)."""
    started = time.monotonic()
    # TEI has no handler for SIGINT until it serves; Python's default
    # (KeyboardInterrupt) would turn a Ctrl-C during the load into a traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    settings = parse_settings(argv)
    log = TeiLog(settings.json_output)
    logging.basicConfig(level=logging.WARNING, handlers=[_WarningsToTeiLog(log)], force=True)
    log.info(MAIN, _args_line(settings))
    try:
        resolved = resolve_model(
            settings.model_id,
            revision=settings.revision,
            hub_cache=settings.huggingface_hub_cache,
        )
    except ModelNotFound as exc:
        fatal("Could not download model artifacts", str(exc))
        return 1
    log.info(MAIN, f"Model {settings.model_id} found at {resolved.path} ({resolved.source})")
    log.info(BACKEND, "Starting model backend")
    # Offline for good: nothing below may reach for the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from .engine import EngineError, load_engine

    try:
        engine = load_engine(resolved.path, pooling=settings.pooling, dtype=settings.dtype)
    except EngineError as exc:
        fatal("Could not create backend", str(exc))
        return 1
    if engine.max_input_length > settings.max_batch_tokens:
        if not settings.auto_truncate:
            fatal(
                "Could not create the router",
                f"`--max-batch-tokens` cannot be lower than the model `max_input_length` "
                f"({settings.max_batch_tokens} < {engine.max_input_length})",
            )
            return 1
        log.warn(
            MAX_TOKENS,
            f"The input length ({engine.max_input_length}) is bigger than `--max-batch-tokens` "
            f"({settings.max_batch_tokens}); truncating to {settings.max_batch_tokens}",
        )
        engine.max_input_length = settings.max_batch_tokens
    log.info(MAX_TOKENS, f"Maximum number of tokens per request: {engine.max_input_length}")
    log.info(WARMUP, "Warming up model")
    try:
        _warm_up(engine)
    except Exception as exc:
        fatal("Model backend is not healthy", f"{type(exc).__name__}: {exc}")
        return 1
    log.info(WARMUP, f"Model loaded and warmed up in {time.monotonic() - started:.2f}s")
    return trio.run(serve, settings, engine, log)
