"""Whose socket answers on an instance's port: ours, or a stranger's.

A probe that answers proves only that *something* serves gRPC health on the
port. Another process (a leftover, another manager's instance, anything) may
hold it, and then the instance's own process will fail to bind. So readiness
also asks the kernel who owns the listening socket:

1. ``/proc/net/tcp`` and ``/proc/net/tcp6`` list every listening socket with
   its local address and inode; the ones a connection to ``127.0.0.1:port``
   can reach (bound to ``127.0.0.1``, ``0.0.0.0``, ``::`` or
   ``::ffff:127.0.0.1``) are the port's listeners;
2. ``/proc/<pid>/fd/*`` links read ``socket:[<inode>]`` for the sockets a
   process holds; the instance's process, or any process of its process group
   or session (the instance leads both), owns the port when every listener's
   inode is among them.

The parsing is pure (table-tested); `proc_port_owner` is the thin reading
seam, with the ``/proc`` root injectable. Where the kernel's tables cannot be
read, the answer is `PortOwner.UNKNOWN` and the caller falls back to asking
the answering server which model it serves (``tei.v1.Info``).
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "PortOwner",
    "PortOwnerCheck",
    "TcpListener",
    "judge_port",
    "parse_listeners",
    "parse_socket_inode",
    "parse_stat_groups",
    "proc_port_owner",
    "reaches_loopback",
]

#: The TCP state number of a listening socket in ``/proc/net/tcp``.
_LISTEN = "0A"


class PortOwner(enum.Enum):
    """Who listens on a port, as far as a probe to ``127.0.0.1`` can tell."""

    #: Every listener that a loopback connection can reach is the instance's.
    OURS = "ours"
    #: Some such listener belongs to another process.
    STRANGER = "stranger"
    #: Nothing listens there.
    NOBODY = "nobody"
    #: The kernel's tables could not be read.
    UNKNOWN = "unknown"


#: ``check(port, pid)``: who owns the listener on ``port``, relative to the
#: process ``pid`` (an instance's process-group and session leader).
PortOwnerCheck = Callable[[int, int], PortOwner]


class TcpListener(NamedTuple):
    """One listening socket from ``/proc/net/tcp{,6}``."""

    address: str  # the local address, as text ("127.0.0.1", "::")
    port: int
    inode: int


def _ipv4(hex_address: str) -> str:
    # /proc prints the 32-bit address in host byte order (little-endian here).
    raw = bytes.fromhex(hex_address)
    return ".".join(str(b) for b in reversed(raw))


def _ipv6(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    # Four 32-bit words, each in host byte order.
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(packed)
    mapped = address.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else str(address)


def parse_listeners(text: str, *, ipv6: bool = False) -> list[TcpListener]:
    """The listening sockets in the text of ``/proc/net/tcp`` (or ``tcp6``).

    Lines that do not parse (the header, a truncated last line) are skipped.
    """
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        local, _, port_hex = fields[1].partition(":")
        try:
            address = _ipv6(local) if ipv6 else _ipv4(local)
            found.append(TcpListener(address, int(port_hex, 16), int(fields[9])))
        except ValueError:
            continue
    return found


def reaches_loopback(address: str) -> bool:
    """Whether a listener bound to ``address`` takes connections to 127.0.0.1.

    ``::`` counts: a dual-stack socket does, and /proc does not show
    ``IPV6_V6ONLY``, so a stranger there is assumed to be in the way.
    """
    return address in ("127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0")


def parse_socket_inode(link: str) -> int | None:
    """The inode of an ``fd`` link that reads ``socket:[<inode>]``, else None."""
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


def parse_stat_groups(text: str) -> tuple[int, int] | None:
    """``(process group, session)`` from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself contain
    spaces and parentheses, so the fields are counted after its last ``)``.
    """
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 4:
        return None
    try:
        return int(fields[2]), int(fields[3])
    except ValueError:
        return None


def judge_port(listening: Iterable[int] | None, ours: Iterable[int] | None) -> PortOwner:
    """The verdict from the port's listener inodes and the inodes our processes hold.

    ``None`` for either means it could not be read.
    """
    if listening is None:
        return PortOwner.UNKNOWN
    wanted = set(listening)
    if not wanted:
        return PortOwner.NOBODY
    if ours is None:
        return PortOwner.UNKNOWN
    return PortOwner.OURS if wanted <= set(ours) else PortOwner.STRANGER


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _listening_inodes(port: int, proc: Path) -> set[int] | None:
    inodes: set[int] = set()
    readable = False
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        text = _read(proc / "net" / name)
        if text is None:
            continue  # no IPv6 on this host, say
        readable = True
        for listener in parse_listeners(text, ipv6=ipv6):
            if listener.port == port and reaches_loopback(listener.address):
                inodes.add(listener.inode)
    return inodes if readable else None


def _socket_inodes(pid: int, proc: Path) -> set[int] | None:
    fd_dir = proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            inode = parse_socket_inode(os.readlink(fd_dir / name))
        except OSError:
            continue  # closed meanwhile
        if inode is not None:
            inodes.add(inode)
    return inodes


def _group_members(leader: int, proc: Path) -> list[int]:
    members: list[int] = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit() or int(entry) == leader:
            continue
        text = _read(proc / entry / "stat")
        groups = parse_stat_groups(text) if text is not None else None
        if groups is not None and leader in groups:
            members.append(int(entry))
    return members


def proc_port_owner(port: int, pid: int, *, proc: str | os.PathLike[str] = "/proc") -> PortOwner:
    """Who owns the listener on ``127.0.0.1:port``: ``pid``'s process group, or not.

    The leader's own sockets are read first; the rest of its group and
    session are scanned only when they do not account for every listener
    (TEI's router may hand the socket to a child it spawned).
    """
    root = Path(proc)
    listening = _listening_inodes(port, root)
    if not listening:
        return judge_port(listening, None)
    ours = _socket_inodes(pid, root)
    verdict = judge_port(listening, ours)
    if verdict is not PortOwner.STRANGER:
        return verdict
    held = set(ours or ())
    for member in _group_members(pid, root):
        held |= _socket_inodes(member, root) or set()
    return judge_port(listening, held)
