"""Ports for tests that run a real teisup: never the ones another teisup uses.

Another manager on the machine (``tools/hold_ports.py`` plays one) may hold
every port of 8080-8180, the default instance range, so each teisup a test
starts allocates from a private block of its own.
"""

from __future__ import annotations

import random
import socket

#: Ports in a block: instance ports, then as many Prometheus ports.
BLOCK = 64


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def private_port_block() -> range:
    """A random block of ``2 * BLOCK`` ports below the ephemeral range."""
    base = random.randrange(10_000, 30_000, 2 * BLOCK)
    return range(base, base + 2 * BLOCK)


def with_private_ports(config: str, block: range) -> str:
    """``config`` (a teisup.toml) allocating instance ports from ``block``.

    A config that sets its own instance ports keeps them (TOML refuses a key
    twice); the keys go first, before any table.
    """
    if "instance_port_start" in config:
        return config
    first, middle = block.start, block.start + BLOCK
    return (
        f"instance_port_start = {first}\ninstance_port_end = {middle - 1}\n"
        f"prometheus_port_start = {middle}\nprometheus_port_end = {block.stop - 1}\n" + config
    )
