"""Port allocation: ranges, reserved and held ports, the bind probe (faked and real)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from teisup.instances.ports import (
    PortAllocator,
    PortError,
    PortRange,
    PortRangeExhausted,
    Ports,
    PortUnavailable,
    tcp_port_is_bindable,
)


class FakeProbe:
    """A bind probe whose occupied ports the test declares; records what was probed."""

    def __init__(self, *busy: int) -> None:
        self.busy = set(busy)
        self.probed: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> bool:
        self.probed.append((host, port))
        return port not in self.busy


def allocator(*busy: int, **kwargs: object) -> PortAllocator:
    return PortAllocator(is_bindable=FakeProbe(*busy), **kwargs)  # type: ignore[arg-type]


def test_defaults_give_first_ports_of_each_range() -> None:
    ports = allocator().allocate("a")
    assert ports == Ports(8080, 9100)
    assert ports.port == 8080
    assert ports.prometheus_port == 9100


def test_round_robin_does_not_reuse_a_released_port_at_once() -> None:
    alloc = allocator()
    assert alloc.allocate("a") == (8080, 9100)
    assert alloc.allocate("b") == (8081, 9101)
    alloc.release("a")
    assert alloc.allocate("c") == (8082, 9102)


def test_cursor_wraps_around_to_released_ports() -> None:
    alloc = allocator(instance_ports=PortRange(8080, 8082), prometheus_ports=PortRange(9100, 9102))
    for name in "abc":
        alloc.allocate(name)
    alloc.release("b")
    assert alloc.allocate("d") == (8081, 9101)


def test_skips_held_reserved_and_unbindable_ports() -> None:
    alloc = allocator(
        8080,
        9100,
        instance_ports=PortRange(8080, 8090),
        prometheus_ports=PortRange(8999, 9105),
        manager_ports={8081: "the manager's API port"},
    )
    alloc.reserve("old", 8082, 8999)
    # 8080 busy, 8081 manager, 8082 held; 8999 held, 9000 TEI default, 9100 busy.
    assert alloc.allocate("new") == (8083, 9001)


def test_probe_gets_the_configured_host() -> None:
    probe = FakeProbe()
    PortAllocator(is_bindable=probe, host="127.0.0.1").allocate("a")
    assert probe.probed == [("127.0.0.1", 8080), ("127.0.0.1", 9100)]


def test_tei_defaults_are_reserved_even_inside_a_range() -> None:
    alloc = allocator(instance_ports=PortRange(3000, 3001))
    assert alloc.allocate("a").port == 3001
    assert set(alloc.reserved) == {3000, 9000}


def test_overlapping_ranges_never_hand_out_one_port_twice() -> None:
    both = PortRange(8080, 8083)
    alloc = allocator(instance_ports=both, prometheus_ports=both)
    assert alloc.allocate("a") == (8080, 8081)
    assert alloc.allocate("b") == (8082, 8083)


def test_exhaustion_names_the_range() -> None:
    alloc = allocator(8081, instance_ports=PortRange(8080, 8081))
    alloc.allocate("a")
    with pytest.raises(PortRangeExhausted, match=r"no free port in range 8080-8081") as info:
        alloc.allocate("b")
    assert info.value.port_range == PortRange(8080, 8081)
    assert alloc.ports_of("b") is None  # nothing recorded on failure


def test_prometheus_exhaustion_names_its_range() -> None:
    alloc = allocator(*range(9100, 9200))
    with pytest.raises(PortRangeExhausted, match=r"no free prometheus port in range 9100-9199"):
        alloc.allocate("a")
    assert alloc.holders() == {}


def test_explicit_ports_are_used_as_given() -> None:
    alloc = allocator()
    assert alloc.allocate("a", port=18080, prometheus_port=19100) == (18080, 19100)
    assert alloc.holder_of(18080) == "a"
    assert alloc.holder_of(19100) == "a"


def test_explicit_port_held_by_another_instance_names_it() -> None:
    alloc = allocator()
    alloc.allocate("bge-small")
    with pytest.raises(PortUnavailable) as info:
        alloc.allocate("splade", port=8080)
    assert str(info.value) == "port 8080 is unavailable: held by instance 'bge-small'"
    assert info.value.port == 8080
    with pytest.raises(PortUnavailable, match="prometheus port 9100 is unavailable: held by"):
        alloc.allocate("splade", prometheus_port=9100)
    with pytest.raises(PortUnavailable, match="port 9100 is unavailable: held by"):
        alloc.allocate("splade", port=9100)


@pytest.mark.parametrize(
    ("port", "reason"),
    [
        (3000, r"reserved \(TEI's default --port\)"),
        (9000, r"reserved \(TEI's default --prometheus-port\)"),
        (9090, r"reserved \(the manager's gRPC port\)"),
    ],
)
def test_explicit_reserved_port_says_why(port: int, reason: str) -> None:
    alloc = allocator(manager_ports={9090: "the manager's gRPC port"})
    with pytest.raises(PortUnavailable, match=reason):
        alloc.allocate("a", port=port)


def test_explicit_unbindable_port_is_refused() -> None:
    with pytest.raises(PortUnavailable, match="in use by another process"):
        allocator(8500).allocate("a", port=8500)


def test_explicit_ports_must_differ() -> None:
    with pytest.raises(PortUnavailable, match="also the instance port"):
        allocator().allocate("a", port=8500, prometheus_port=8500)


def test_auto_port_avoids_the_explicit_other_port() -> None:
    assert allocator().allocate("a", prometheus_port=8080) == (8081, 8080)


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_port_numbers_outside_1_65535_are_rejected(port: int) -> None:
    with pytest.raises(PortError, match="integer in 1-65535"):
        allocator().allocate("a", port=port)


def test_same_name_twice_is_an_error() -> None:
    alloc = allocator()
    alloc.allocate("a")
    with pytest.raises(PortError, match="'a' already holds port 8080 and prometheus port 9100"):
        alloc.allocate("a")
    with pytest.raises(PortError, match="already holds"):
        alloc.reserve("a", 8500, 9500)


def test_reserve_skips_the_probe_but_not_the_holders() -> None:
    probe = FakeProbe(8080, 9100)
    alloc = PortAllocator(is_bindable=probe)
    assert alloc.reserve("restored", 8080, 9100) == (8080, 9100)  # its own process is bound
    assert probe.probed == []
    with pytest.raises(PortUnavailable, match="held by instance 'restored'"):
        alloc.reserve("other", 8081, 9100)
    with pytest.raises(PortUnavailable, match="reserved"):
        alloc.reserve("other", 3000, 9101)
    assert alloc.holders() == {"restored": Ports(8080, 9100)}


def test_release_frees_both_ports() -> None:
    alloc = allocator()
    alloc.allocate("a", port=8500, prometheus_port=9500)
    assert alloc.release("a") == (8500, 9500)
    assert alloc.release("a") is None
    assert alloc.holder_of(8500) is None
    assert alloc.allocate("b", port=8500, prometheus_port=9500) == (8500, 9500)


@pytest.mark.parametrize(("first", "last"), [(0, 10), (10, 9), (65535, 65536)])
def test_invalid_ranges_are_rejected(first: int, last: int) -> None:
    with pytest.raises(ValueError, match="invalid port range"):
        PortRange(first, last)


def test_port_range_basics() -> None:
    r = PortRange(8080, 8179)
    assert len(r) == 100
    assert 8179 in r
    assert 8180 not in r
    assert str(r) == "8080-8179"
    assert list(PortRange(1, 4).from_cursor(3)) == [3, 4, 1, 2]
    assert list(PortRange(1, 4).from_cursor(5)) == [1, 2, 3, 4]


# Real sockets. A listener on an ephemeral port stands for "another process".


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_real_probe_sees_a_listener(listening_port: int) -> None:
    assert not tcp_port_is_bindable("127.0.0.1", listening_port)
    # The wildcard address conflicts with a listener on any local address.
    assert not tcp_port_is_bindable("0.0.0.0", listening_port)


def test_real_probe_accepts_a_free_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert tcp_port_is_bindable("0.0.0.0", port)


def test_real_probe_ignores_time_wait() -> None:
    # The side that closes first keeps TIME_WAIT on the listening port's address,
    # as when a server closes its connections and exits.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # server side closes first: TIME_WAIT on 127.0.0.1:port
        client.close()
    with socket.socket() as plain, pytest.raises(OSError, match="in use"):
        plain.bind(("127.0.0.1", port))  # without SO_REUSEADDR, TIME_WAIT blocks the bind
    assert tcp_port_is_bindable("127.0.0.1", port)  # as for TEI, which sets SO_REUSEADDR


def test_real_sockets_allocation_skips_a_bound_port(listening_port: int) -> None:
    alloc = PortAllocator(
        instance_ports=PortRange(listening_port, min(listening_port + 20, 65535)),
        prometheus_ports=PortRange(1024, 65535),
    )
    assert alloc.allocate("a").port != listening_port


def test_real_sockets_explicit_bound_port_is_refused(listening_port: int) -> None:
    alloc = PortAllocator()
    with pytest.raises(PortUnavailable) as info:
        alloc.allocate("a", port=listening_port)
    assert f"cannot bind 0.0.0.0:{listening_port}" in str(info.value)


def test_reassign_gives_a_fresh_port_and_frees_the_old_one() -> None:
    probe = FakeProbe()
    alloc = PortAllocator(
        is_bindable=probe,
        instance_ports=PortRange(8080, 8082),
        prometheus_ports=PortRange(9100, 9102),
    )
    assert alloc.allocate("a") == (8080, 9100)
    probe.busy.add(8081)  # a stranger took the next one too
    assert alloc.reassign("a") == (8082, 9100)
    assert alloc.holder_of(8080) is None
    assert alloc.holder_of(8082) == "a"
    # The range wraps, but never back to the port being replaced.
    assert alloc.reassign("a", prometheus_port=True) == (8080, 9101)
    assert alloc.ports_of("a") == (8080, 9101)


def test_reassign_with_nothing_free_keeps_the_old_ports() -> None:
    alloc = allocator(8081, instance_ports=PortRange(8080, 8081))
    alloc.allocate("a")
    with pytest.raises(PortRangeExhausted):
        alloc.reassign("a")
    assert alloc.ports_of("a") == (8080, 9100)
    with pytest.raises(PortError, match="holds no ports"):
        alloc.reassign("nobody")


def test_bindable_asks_the_bind_probe_for_the_instances_host() -> None:
    probe = FakeProbe(8085)
    alloc = PortAllocator(is_bindable=probe, host="127.0.0.1")
    assert (alloc.bindable(8085), alloc.bindable(8086)) == (False, True)
    assert probe.probed == [("127.0.0.1", 8085), ("127.0.0.1", 8086)]
