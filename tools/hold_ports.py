"""Play "another teisup on this machine": hold every free port of 8080-8180.

Each held port answers gRPC health as SERVING, as another manager's TEI
instances would, so a test that trusts a port's health answer, or expects a
fixed port, fails while this runs. The suite must pass beside it::

    python tools/hold_ports.py &            # prints how many ports it holds
    python -m pytest                        # then stop it with Ctrl-C / SIGTERM

Loopback only; ports already taken are skipped.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from teisup.rpc import HealthServicer, Server, ServingStatus


async def hold(first: int, last: int) -> None:
    health = HealthServicer({"": ServingStatus.SERVING})
    held = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for port in range(first, last + 1):
                server = Server(port, host="127.0.0.1")
                server.add_service(health)
                try:
                    await nursery.start(server.serve_async)
                except OSError:
                    continue
                held += 1
            print(f"holding {held} ports of {first}-{last}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=8080)
    parser.add_argument("--last", type=int, default=8180)
    args = parser.parse_args(argv)
    trio.run(hold, args.first, args.last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
