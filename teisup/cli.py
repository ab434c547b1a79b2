"""The ``teisup`` command: the container entrypoint, or run by hand."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from . import __version__
from .instances import LauncherError, resolve_launcher
from .security import TlsError
from .security import validate as validate_tls
from .service import (
    ENVIRONMENT,
    TLS_ENVIRONMENT,
    ConfigError,
    ManagerConfig,
    Service,
    load_config,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger("teisup")


#: ``--log-level`` values: Python's names and tei-manager's (tracing's ``trace``, ``warn``).
LOG_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def build_parser() -> argparse.ArgumentParser:
    variables = {**ENVIRONMENT, **{var: f"tls.{key}" for var, key in TLS_ENVIRONMENT.items()}}
    width = max(map(len, variables))
    epilog = (
        "environment variables (override the config file; flags override them):\n"
        + "\n".join(f"  {var:<{width}}  {key}" for var, key in variables.items())
        + "\n\nEvery key, variable and flag with its default: docs/CONFIGURATION.md"
    )
    parser = argparse.ArgumentParser(
        prog="teisup",
        description="Run and supervise HuggingFace Text Embeddings Inference instances.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"teisup {__version__}")
    parser.add_argument(
        "command", nargs="?", default="serve", choices=["serve"], help="what to do (default: serve)"
    )
    parser.add_argument("-c", "--config", help="TOML config file")
    # --port is tei-manager's name for it.
    parser.add_argument(
        "--api-port", "--port", dest="api_port", type=int, help="REST API port (default 9000)"
    )
    parser.add_argument("--grpc-port", type=int, help="gRPC multiplexer port (default 9001)")
    parser.add_argument(
        "--grpc-workers",
        type=int,
        help="processes serving the gRPC multiplexer (default: the CPU count, at most 8)",
    )
    parser.add_argument("--state-file", help="state snapshot file (.toml or .json)")
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=sorted(LOG_LEVELS),
        help="log verbosity (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default="json",
        choices=["json", "pretty"],
        help="log line format (default: json, as tei-manager)",
    )
    return parser


#: Fields a log record may carry (``extra=``) that JSON lines show, where they apply.
LOG_FIELDS = ("event", "instance", "pid", "model_id", "state", "child")


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp, level, target, message, then the
    record's `LOG_FIELDS` (an instance's name, pid, model id, the event)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=LOG_LEVELS[level], handlers=[handler], force=True)


async def serve(config: ManagerConfig, launcher: list[str] | None = None) -> None:
    """Run the service until SIGTERM or SIGINT, then stop it gracefully."""
    service = Service(config, launcher=launcher)
    # SIGHUP too: its default action would kill teisup outright. The service's
    # `reload` child takes it over while it runs (loading TLS files again);
    # before and after that it is only noted here.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            logger.info("teisup %s running; stop with SIGTERM or Ctrl-C", __version__)

            async def wait_for_signal() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        logger.info("SIGHUP while starting or stopping: nothing reloaded")
                        continue
                    logger.info("received %s; stopping", signal.Signals(signum).name)
                    await service.stop()
                    return

            nursery.start_soon(wait_for_signal)
            await service.root.wait_stopped()
            nursery.cancel_scope.cancel()
    logger.info("teisup stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    overrides = {
        key: value
        for key, value in (
            ("api_port", args.api_port),
            ("grpc_port", args.grpc_port),
            ("grpc_workers", args.grpc_workers),
            ("state_file", args.state_file),
        )
        if value is not None
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"teisup: {exc}", file=sys.stderr)
        return 2
    try:
        config.resolve_api_token()
        validate_tls(config.tls)
        # Before anything starts: a configured binary that cannot run is an error.
        launcher = resolve_launcher(config.tei_binary_path)
    except (ConfigError, TlsError, LauncherError) as exc:
        print(f"teisup: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(serve, config, launcher)
    except OSError as exc:
        logger.error("cannot run: %s", exc)
        return 1
    return 0
