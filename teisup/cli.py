"""The ``teisup`` command: run the manager as a container entrypoint or by hand."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .supervision import Supervisor

__all__ = ["build_parser", "main"]

logger = logging.getLogger("teisup")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teisup",
        description="Run and supervise HuggingFace Text Embeddings Inference instances.",
    )
    parser.add_argument("--version", action="version", version=f"teisup {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve"],
        help="what to do (default: serve)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    return parser


async def serve() -> None:
    """Run the root supervisor until SIGTERM or SIGINT, then stop it gracefully."""
    root = Supervisor("root")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            logger.info("teisup %s running; stop with SIGTERM or Ctrl-C", __version__)
            async for signum in signals:
                logger.info("received %s; stopping", signal.Signals(signum).name)
                await root.stop()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    trio.run(serve)
    return 0
