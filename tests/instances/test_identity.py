"""Who owns a port's listener: the parsing as tables, the /proc reading for real."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from teisup.instances.identity import (
    PortOwner,
    TcpListener,
    judge_port,
    parse_listeners,
    parse_socket_inode,
    parse_stat_groups,
    proc_port_owner,
    reaches_loopback,
)
from teisup.instances.runner import says_port_taken

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0
   1: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4243 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 4244 1 0 20 4 30 10 -1
   3: 0500A8C0:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4245 1 0 100 0 0 10 0
   4: garbage
"""  # noqa: E501

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F93 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5151 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F94 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5152 1 0 100 0 0 10 0
   2: 00000000000000000000000001000000:1F95 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5153 1 0 100 0 0 10 0
"""  # noqa: E501


def test_listening_sockets_are_read_from_proc_net_tcp() -> None:
    # The established connection (st 01) and the garbage line are not listeners.
    assert parse_listeners(TCP) == [
        TcpListener("127.0.0.1", 8080, 4242),
        TcpListener("0.0.0.0", 8081, 4243),
        TcpListener("192.168.0.5", 8082, 4245),
    ]


def test_listening_sockets_are_read_from_proc_net_tcp6() -> None:
    assert parse_listeners(TCP6, ipv6=True) == [
        TcpListener("::", 8083, 5151),
        TcpListener("::ffff:127.0.0.1", 8084, 5152),
        TcpListener("::1", 8085, 5153),
    ]


@pytest.mark.parametrize(
    ("address", "reaches"),
    [
        ("127.0.0.1", True),
        ("0.0.0.0", True),
        ("::", True),
        ("::ffff:127.0.0.1", True),
        ("127.0.0.2", False),
        ("192.168.0.5", False),
        ("::1", False),
    ],
)
def test_which_listeners_a_probe_to_127_0_0_1_can_reach(address: str, reaches: bool) -> None:
    assert reaches_loopback(address) is reaches


@pytest.mark.parametrize(
    ("link", "inode"),
    [
        ("socket:[4242]", 4242),
        ("pipe:[4242]", None),
        ("/dev/null", None),
        ("socket:[x]", None),
        ("anon_inode:[eventpoll]", None),
    ],
)
def test_socket_inodes_from_fd_links(link: str, inode: int | None) -> None:
    assert parse_socket_inode(link) == inode


@pytest.mark.parametrize(
    ("stat", "groups"),
    [
        ("123 (python3) S 1 123 123 0 -1 4194560 ...", (123, 123)),
        ("124 (text (embed) r) S 123 123 120 0 -1", (123, 120)),
        ("125 (a b) Z 1", None),
        ("", None),
        ("126 (x) S 1 pg sid", None),
    ],
)
def test_process_group_and_session_from_stat(stat: str, groups: tuple[int, int] | None) -> None:
    assert parse_stat_groups(stat) == groups


@pytest.mark.parametrize(
    ("listening", "ours", "verdict"),
    [
        ({1}, {1, 2}, PortOwner.OURS),
        ({1, 3}, {1, 2}, PortOwner.STRANGER),
        ({3}, {1, 2}, PortOwner.STRANGER),
        ({3}, set(), PortOwner.STRANGER),
        (set(), {1}, PortOwner.NOBODY),
        (set(), None, PortOwner.NOBODY),
        (None, {1}, PortOwner.UNKNOWN),
        ({1}, None, PortOwner.UNKNOWN),
    ],
)
def test_the_verdict_table(
    listening: set[int] | None, ours: set[int] | None, verdict: PortOwner
) -> None:
    assert judge_port(listening, ours) is verdict


@pytest.mark.parametrize(
    ("text", "taken"),
    [
        ("Error: Could not start gRPC server | Address already in use (os error 98)", True),
        ("Could not bind TCP Listener on 127.0.0.1:8080 | [Errno 98] error while attempting", True),
        ("Error: Could not download model artifacts", False),
        ("", False),
    ],
)
def test_a_bind_failure_is_recognised_in_the_last_words(text: str, taken: bool) -> None:
    assert says_port_taken(text) is taken


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen()
    return sock


def test_a_socket_this_process_holds_is_ours_and_a_strangers_to_another() -> None:
    with listening_socket() as ours:
        port = ours.getsockname()[1]
        assert proc_port_owner(port, os.getpid()) is PortOwner.OURS
        # Seen from an unrelated process (pid 1 is no member of our group).
        assert proc_port_owner(port, 1) is PortOwner.STRANGER
    assert proc_port_owner(port, os.getpid()) is PortOwner.NOBODY


def test_a_wildcard_listener_counts_and_one_on_another_address_does_not() -> None:
    with listening_socket("0.0.0.0") as wildcard:
        assert proc_port_owner(wildcard.getsockname()[1], 1) is PortOwner.STRANGER
    with listening_socket("127.0.0.2") as elsewhere:
        assert proc_port_owner(elsewhere.getsockname()[1], 1) is PortOwner.NOBODY


def test_a_socket_held_by_a_member_of_the_group_is_ours() -> None:
    # The leader (its own session and group) hands the listener to a child
    # and closes its own copy: the socket belongs to another member.
    code = (
        "import os, socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "port = s.getsockname()[1]; s.close()\n"
        "print(port, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    ) as leader:
        try:
            assert leader.stdout is not None
            port = int(leader.stdout.readline())
            assert proc_port_owner(port, leader.pid) is PortOwner.OURS
            assert proc_port_owner(port, os.getpid()) is PortOwner.STRANGER
        finally:
            os.killpg(leader.pid, signal.SIGKILL)


def test_unreadable_tables_are_unknown(tmp_path: Path) -> None:
    # An empty /proc: nothing to read, so nothing is decided.
    assert proc_port_owner(8080, 1234, proc=tmp_path) is PortOwner.UNKNOWN
    # Listeners readable, the process's descriptors not.
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP)
    assert proc_port_owner(8080, 1234, proc=tmp_path) is PortOwner.UNKNOWN
    assert proc_port_owner(8090, 1234, proc=tmp_path) is PortOwner.NOBODY
    # With them: a /proc laid out by hand, the group member holding the socket.
    (tmp_path / "1234" / "fd").mkdir(parents=True)
    (tmp_path / "1234" / "stat").write_text("1234 (router) S 1 1234 1234 0")
    (tmp_path / "1240" / "fd").mkdir(parents=True)
    (tmp_path / "1240" / "stat").write_text("1240 (worker) S 1234 1234 1234 0")
    (tmp_path / "1240" / "fd" / "3").symlink_to("socket:[4242]")
    assert proc_port_owner(8080, 1234, proc=tmp_path) is PortOwner.OURS
    assert proc_port_owner(8081, 1234, proc=tmp_path) is PortOwner.STRANGER
