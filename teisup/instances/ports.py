"""Port allocation for TEI instances: an instance port and a Prometheus port each.

`PortAllocator` is plain data plus one injected seam, the bind probe, so tests
can declare any port occupied. It is synchronous on purpose: Trio code calls
`PortAllocator.allocate` without an ``await`` between choosing and recording a
port, so two concurrent creates can never be handed the same one.

Decisions, and why:

- **Ranges.** Instance ports come from 8080-8179 (tei-manager's default range).
  Prometheus ports come from a bounded 9100-9199: tei-manager starts its
  Prometheus counter at 9100, so scrape configs and firewall rules written for
  it keep working, and the range is as large as the instance range, so the two
  run out together. 9100 is also node_exporter's port; the bind probe skips it
  wherever node_exporter is running.
- **Reserved ports** are never handed out, even when free: TEI's defaults 3000
  (``--port``) and 9000 (``--prometheus-port``), which any TEI started without
  explicit flags would take, and the manager's own listening ports.
- **Round-robin.** Each range has a cursor that moves past the last port it
  gave out, as in tei-manager. A port released by a deleted instance is thus
  reused as late as possible, so stale clients of the old instance do not
  silently reach a new model, and its old process has time to let go.
- **The bind probe and TIME_WAIT.** `tcp_port_is_bindable` binds (without
  listening) the address TEI will bind, by default ``0.0.0.0``, which TEI uses
  when no ``--hostname`` is given. A wildcard bind conflicts with a listener on
  *any* local address, so it is the strictest check; probing ``127.0.0.1``
  would miss a listener bound to another interface. It sets ``SO_REUSEADDR``
  because TEI does: Rust's ``std``/``tokio`` listeners set it on Unix. So a port
  whose only trace is TIME_WAIT connections counts as free, which is true for
  TEI too; without the option a recently deleted instance's port would look
  busy for about a minute. Any listener still fails the probe.
- A probe is only a snapshot: another process may take the port before TEI
  binds it. TEI then exits with "Address already in use" (or the runner sees
  the stranger listening there first), and `PortAllocator.reassign` gives an
  automatically assigned port a fresh one for the next run.
- **Restored ports** (from the state file) are checked too: an automatically
  assigned one that is taken by then is replaced (`reassign`); one the user
  set is kept, and its start fails naming it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import NamedTuple

import msgspec

__all__ = [
    "BindProbe",
    "DEFAULT_INSTANCE_PORTS",
    "DEFAULT_PROMETHEUS_PORTS",
    "PortAllocator",
    "PortError",
    "PortRange",
    "PortRangeExhausted",
    "PortUnavailable",
    "Ports",
    "TEI_DEFAULT_PORTS",
    "tcp_port_is_bindable",
]

#: ``is_bindable(host, port)``: could a listener bind ``host:port`` right now?
BindProbe = Callable[[str, int], bool]

#: Ports TEI takes when started without ``--port`` / ``--prometheus-port``.
TEI_DEFAULT_PORTS: Mapping[int, str] = {
    3000: "TEI's default --port",
    9000: "TEI's default --prometheus-port",
}

_MIN_PORT, _MAX_PORT = 1, 65535


class PortError(ValueError):
    """Base of the allocator's errors; all are the caller's request, not a crash."""


class PortUnavailable(PortError):
    """A requested port cannot be used; `reason` says why."""

    def __init__(self, port: int, reason: str, *, kind: str = "port") -> None:
        super().__init__(f"{kind} {port} is unavailable: {reason}")
        self.port = port
        self.reason = reason


class PortRangeExhausted(PortError):
    """No port of a range is free."""

    def __init__(self, kind: str, port_range: PortRange) -> None:
        super().__init__(
            f"no free {kind} in range {port_range}: every port is held by an instance, "
            "reserved, or bound by another process; widen the range or delete instances"
        )
        self.port_range = port_range


class PortRange(msgspec.Struct, frozen=True):
    """An inclusive range of TCP ports, ``first``-``last``."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not _MIN_PORT <= self.first <= self.last <= _MAX_PORT:
            raise ValueError(
                f"invalid port range {self.first}-{self.last}: "
                f"need {_MIN_PORT} <= first <= last <= {_MAX_PORT}"
            )

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def from_cursor(self, cursor: int) -> Iterator[int]:
        """Every port once, starting at ``cursor`` and wrapping around."""
        start = cursor if cursor in self else self.first
        yield from range(start, self.last + 1)
        yield from range(self.first, start)


#: tei-manager's default instance range.
DEFAULT_INSTANCE_PORTS = PortRange(8080, 8179)
#: See the module notes for why 9100-9199.
DEFAULT_PROMETHEUS_PORTS = PortRange(9100, 9199)


class Ports(NamedTuple):
    """The two ports of one instance."""

    port: int
    prometheus_port: int


def tcp_port_is_bindable(host: str, port: int) -> bool:
    """Whether a TCP listener could bind ``host:port`` now (see the module notes).

    The socket is bound and closed at once, never listened on. Address-in-use
    and permission errors (a privileged port) answer ``False``; any other error,
    such as an unknown host, is raised.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


class PortAllocator:
    """Hands out instance and Prometheus ports and remembers who holds them.

    ``manager_ports`` maps the manager's own listening ports (API, gRPC) to a
    description used in error messages; they join `TEI_DEFAULT_PORTS` as
    reserved. ``host`` is the address the instances will bind, handed to
    ``is_bindable``.
    """

    def __init__(
        self,
        *,
        instance_ports: PortRange = DEFAULT_INSTANCE_PORTS,
        prometheus_ports: PortRange = DEFAULT_PROMETHEUS_PORTS,
        manager_ports: Mapping[int, str] | None = None,
        is_bindable: BindProbe = tcp_port_is_bindable,
        host: str = "0.0.0.0",
    ) -> None:
        self.instance_ports = instance_ports
        self.prometheus_ports = prometheus_ports
        self.host = host
        self._is_bindable = is_bindable
        self._reserved: dict[int, str] = dict(TEI_DEFAULT_PORTS)
        for port, what in (manager_ports or {}).items():
            _check_number(port, "manager port")
            self._reserved[port] = what
        self._holders: dict[str, Ports] = {}
        self._held: dict[int, str] = {}
        self._cursors = {"port": instance_ports.first, "prometheus port": prometheus_ports.first}

    @property
    def reserved(self) -> Mapping[int, str]:
        """Ports never handed out, with the reason for each."""
        return dict(self._reserved)

    def holders(self) -> dict[str, Ports]:
        """Every instance's ports, by instance name."""
        return dict(self._holders)

    def ports_of(self, name: str) -> Ports | None:
        """The ports ``name`` holds, if any."""
        return self._holders.get(name)

    def holder_of(self, port: int) -> str | None:
        """The instance holding ``port`` (as either of its ports), if any."""
        return self._held.get(port)

    def allocate(
        self, name: str, port: int | None = None, prometheus_port: int | None = None
    ) -> Ports:
        """Choose both ports for a new instance ``name`` and record them as its own.

        An explicit port must be free in every sense (not held, not reserved,
        bindable) or `PortUnavailable` says which. An omitted one is the next
        such port of its range, round-robin, or `PortRangeExhausted`. A ``name``
        that already holds ports is a `PortError`.
        """
        self._check_new_holder(name)
        if port is not None:
            self._check_explicit(port, "port", probe=True)
        if prometheus_port is not None:
            self._check_explicit(prometheus_port, "prometheus port", probe=True)
            if prometheus_port == port:
                raise PortUnavailable(
                    prometheus_port, "it is also the instance port", kind="prometheus port"
                )
        if port is None:
            port = self._next_free("port", self.instance_ports, avoid={prometheus_port})
        if prometheus_port is None:
            prometheus_port = self._next_free(
                "prometheus port", self.prometheus_ports, avoid={port}
            )
        return self._record(name, Ports(port, prometheus_port))

    def bindable(self, port: int) -> bool:
        """Whether an instance could bind ``port`` right now (the bind probe)."""
        return self._is_bindable(self.host, port)

    def reassign(self, name: str, *, port: bool = True, prometheus_port: bool = False) -> Ports:
        """Give ``name`` fresh ports in place of the ones it holds (which are taken).

        ``port`` / ``prometheus_port`` say which to replace; the new one is the
        next free port of its range, never the one replaced. Raises
        `PortRangeExhausted` (keeping the old ports) or `PortError` if ``name``
        holds none.
        """
        old = self._holders.get(name)
        if old is None:
            raise PortError(f"instance {name!r} holds no ports")
        new_port, new_prometheus = old
        # The old ports are still recorded as held, so the search skips them.
        if port:
            new_port = self._next_free("port", self.instance_ports, avoid=set(old))
        if prometheus_port:
            new_prometheus = self._next_free(
                "prometheus port", self.prometheus_ports, avoid={*old, new_port}
            )
        self.release(name)
        return self._record(name, Ports(new_port, new_prometheus))

    def reserve(self, name: str, port: int, prometheus_port: int) -> Ports:
        """Record ports ``name`` already has, e.g. restored from the state file.

        Checks the holders and the reserved ports but not the bind probe: the
        caller asks `bindable` and decides (the manager gives an automatically
        assigned port that is taken a fresh one with `reassign`).
        """
        self._check_new_holder(name)
        self._check_explicit(port, "port", probe=False)
        self._check_explicit(prometheus_port, "prometheus port", probe=False)
        if port == prometheus_port:
            raise PortUnavailable(
                prometheus_port, "it is also the instance port", kind="prometheus port"
            )
        return self._record(name, Ports(port, prometheus_port))

    def release(self, name: str) -> Ports | None:
        """Forget ``name``'s ports (no error if it held none); returns what it held."""
        ports = self._holders.pop(name, None)
        if ports is not None:
            for p in ports:
                del self._held[p]
        return ports

    def _check_new_holder(self, name: str) -> None:
        held = self._holders.get(name)
        if held is not None:
            raise PortError(
                f"instance {name!r} already holds port {held.port} "
                f"and prometheus port {held.prometheus_port}"
            )

    def _check_explicit(self, port: int, kind: str, *, probe: bool) -> None:
        _check_number(port, kind)
        reason = self._why_taken(port)
        if reason is None and probe and not self._is_bindable(self.host, port):
            reason = f"cannot bind {self.host}:{port} (in use by another process, or not permitted)"
        if reason is not None:
            raise PortUnavailable(port, reason, kind=kind)

    def _why_taken(self, port: int) -> str | None:
        holder = self._held.get(port)
        if holder is not None:
            return f"held by instance {holder!r}"
        what = self._reserved.get(port)
        if what is not None:
            return f"reserved ({what})"
        return None

    def _next_free(self, kind: str, port_range: PortRange, *, avoid: Collection[int | None]) -> int:
        for candidate in port_range.from_cursor(self._cursors[kind]):
            if (
                candidate not in avoid
                and self._why_taken(candidate) is None
                and self._is_bindable(self.host, candidate)
            ):
                self._cursors[kind] = candidate + 1
                return candidate
        raise PortRangeExhausted(kind, port_range)

    def _record(self, name: str, ports: Ports) -> Ports:
        self._holders[name] = ports
        for p in ports:
            self._held[p] = name
        return ports


def _check_number(port: int, kind: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not _MIN_PORT <= port <= _MAX_PORT:
        raise PortError(f"{kind} must be an integer in {_MIN_PORT}-{_MAX_PORT}, got {port!r}")
