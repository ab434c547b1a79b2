"""Real processes: spawning, exit codes, group kills, zombies, leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from teisup.instances.process import (
    ProcessSpawner,
    find_marked_processes,
    kill_group,
    proc_state,
    reap_adopted_orphans,
    set_child_subreaper,
    sweep_leftovers,
    wait_for_exit,
)

from .conftest import wait_gone


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        assert chunk, "stream closed before a full line"
        data += chunk
    return data.strip()


def pipe(fileobj: object) -> trio.lowlevel.FdStream:
    fd = fileobj.fileno()  # type: ignore[attr-defined]
    return trio.lowlevel.FdStream(os.dup(fd))


async def test_spawned_child_leads_its_own_group_and_reports_its_exit_code() -> None:
    async with ProcessSpawner() as spawner:
        proc = await spawner.spawn(["sh", "-c", "exit 3"], env={"PATH": os.environ["PATH"]})
        assert os.getpgid(proc.pid) == proc.pid or proc_state(proc.pid) in (None, "Z")
        assert await wait_for_exit(proc) == 3
        assert proc_state(proc.pid) is None  # reaped
    for f in (proc.stdout, proc.stderr):
        assert f is not None
        f.close()


async def test_a_missing_binary_is_a_clear_error() -> None:
    async with ProcessSpawner() as spawner:
        with pytest.raises(FileNotFoundError, match="/nonexistent/text-embeddings-router"):
            await spawner.spawn(["/nonexistent/text-embeddings-router"], env={})


async def test_killing_the_group_takes_the_grandchild_with_it() -> None:
    script = "sleep 1000 & echo $!; wait"
    async with ProcessSpawner() as spawner:
        proc = await spawner.spawn(["sh", "-c", script], env={"PATH": os.environ["PATH"]})
        async with pipe(proc.stdout) as out:
            grandchild = int(await read_line(out))
        assert proc_state(grandchild) not in (None, "Z")
        assert kill_group(proc.pid, signal.SIGKILL)
        assert await wait_for_exit(proc) == -signal.SIGKILL
        with trio.fail_after(10):
            await wait_gone(grandchild)
        assert proc_state(grandchild) in (None, "Z")
    for f in (proc.stdout, proc.stderr):
        assert f is not None
        f.close()


def test_proc_state_sees_zombies_that_kill_0_would_not() -> None:
    child = subprocess.Popen(["true"])
    # Wait for the exit without reaping it.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    os.kill(child.pid, 0)  # succeeds on a zombie: useless as a liveness check
    assert proc_state(child.pid) == "Z"
    child.wait()
    assert proc_state(child.pid) is None


IGNORE_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print(1, flush=True); time.sleep(1000)"
)


def start_leftovers(marker: dict[str, str]) -> tuple[subprocess.Popen[bytes], ...]:
    """Two processes as a dead manager would leave them: one obeys SIGTERM."""
    env = {"PATH": os.environ["PATH"], **marker}
    polite = subprocess.Popen(["sleep", "1000"], env=env, start_new_session=True)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", IGNORE_SIGTERM],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"1\n"  # its handler is installed
    stubborn.stdout.close()
    return polite, stubborn


async def test_sweep_kills_marked_leftovers_even_if_they_ignore_sigterm() -> None:
    marker = {"TEISUP_OWNED_BY": f"test-{uuid.uuid4()}", "TEISUP_INSTANCE": "x"}
    polite, stubborn = start_leftovers(marker)
    assert find_marked_processes(marker) == sorted([polite.pid, stubborn.pid])
    found = await sweep_leftovers(marker, grace=0.5)
    assert found == sorted([polite.pid, stubborn.pid])
    assert await wait_for_exit(polite) == -signal.SIGTERM
    assert await wait_for_exit(stubborn) == -signal.SIGKILL
    assert find_marked_processes(marker) == []


def test_a_subreaper_reaps_the_orphans_it_adopts() -> None:
    assert set_child_subreaper()
    # sh starts a background sleep and exits at once: the sleep is orphaned and,
    # with us as subreaper, adopted by this process.
    out = subprocess.run(
        ["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True
    )
    orphan = int(out.stdout)
    assert proc_state(orphan) not in (None, "Z")
    os.kill(orphan, signal.SIGKILL)
    os.waitid(os.P_PID, orphan, os.WEXITED | os.WNOWAIT)
    assert proc_state(orphan) == "Z"
    assert orphan in reap_adopted_orphans(set())
    assert proc_state(orphan) is None


async def test_children_die_with_the_spawner_thread_and_only_then() -> None:
    # PR_SET_PDEATHSIG is tied to the forking thread. The spawner's thread lives
    # until the spawner closes, so a child outlives every idle worker thread
    # (trio's exit after 10 s idle) and dies when the spawner goes.
    spawner = ProcessSpawner()
    async with spawner:
        proc = await spawner.spawn(["sleep", "1000"], env={"PATH": os.environ["PATH"]})
        for _ in range(3):
            # Worker threads come and go meanwhile; the child does not care.
            await trio.to_thread.run_sync(lambda: None)
        assert proc_state(proc.pid) not in (None, "Z")
        assert proc.pid in spawner.owned_pids()
    with trio.fail_after(10):
        assert await wait_for_exit(proc) == -signal.SIGKILL
    for f in (proc.stdout, proc.stderr):
        assert f is not None
        f.close()


# The subreaper shim every child runs under.

#: Prints the pid of a ``sleep`` in a session of its own once it is there;
#: its parent (a subshell) has exited by then.
DETACH = "pid=$(setsid sh -c 'echo $$; exec sleep 1000 </dev/null >/dev/null 2>&1' &); echo $pid"


async def test_the_exit_status_passes_through_the_shim_unchanged() -> None:
    env = {"PATH": os.environ["PATH"]}
    async with ProcessSpawner() as spawner:
        cases = [
            ("exit 0", 0),
            ("exit 3", 3),
            ("kill -TERM $$", -signal.SIGTERM),
            ("kill -KILL $$", -signal.SIGKILL),
        ]
        for script, status in cases:
            proc = await spawner.spawn(["sh", "-c", script], env=env)
            assert await wait_for_exit(proc) == status, script
            for f in (proc.stdout, proc.stderr):
                assert f is not None
                f.close()


async def test_a_signal_from_anyone_but_the_manager_is_forwarded_to_the_instance() -> None:
    # The manager signals the whole group; anyone else may signal the pid it shows.
    script = "trap 'echo got USR1; exit 5' USR1; echo ready; while :; do sleep 0.05; done"
    async with ProcessSpawner() as spawner:
        proc = await spawner.spawn(["sh", "-c", script], env={"PATH": os.environ["PATH"]})
        async with pipe(proc.stdout) as out:
            assert await read_line(out) == b"ready"
            await trio.run_process(["kill", "-USR1", str(proc.pid)])
            with trio.fail_after(10):
                assert await read_line(out) == b"got USR1"
                assert await wait_for_exit(proc) == 5
        for f in (proc.stdout, proc.stderr):
            assert f is not None
            f.close()


async def test_what_an_instance_leaves_is_killed_when_it_exits_even_outside_its_group() -> None:
    async with ProcessSpawner() as spawner:
        proc = await spawner.spawn(["sh", "-c", DETACH], env={"PATH": os.environ["PATH"]})
        async with pipe(proc.stdout) as out:
            detached = int(await read_line(out))
        with trio.fail_after(10):
            assert await wait_for_exit(proc) == 0
            await wait_gone(detached)
        assert proc_state(detached) in (None, "Z")
        for f in (proc.stdout, proc.stderr):
            assert f is not None
            f.close()


async def test_when_the_manager_goes_the_shim_takes_the_whole_tree_with_it() -> None:
    # Closing the spawner ends the thread the children's parent-death signal is
    # tied to: as when the manager dies.
    script = f"{DETACH}; sleep 1000 & echo $!; wait"
    async with ProcessSpawner() as spawner:
        proc = await spawner.spawn(["sh", "-c", script], env={"PATH": os.environ["PATH"]})
        async with pipe(proc.stdout) as out:
            detached, grandchild = int(await read_line(out)), int(await read_line(out))
        assert os.getpgid(detached) != proc.pid
        assert os.getpgid(grandchild) == proc.pid
    with trio.fail_after(10):
        assert await wait_for_exit(proc) == -signal.SIGKILL
        await wait_gone(detached)
        await wait_gone(grandchild)
    assert proc_state(detached) in (None, "Z")
    for f in (proc.stdout, proc.stderr):
        assert f is not None
        f.close()


async def test_a_binary_that_is_not_executable_is_refused_before_any_fork(tmp_path: Path) -> None:
    binary = tmp_path / "router"
    binary.write_text("#!/bin/sh\n")
    async with ProcessSpawner() as spawner:
        with pytest.raises(PermissionError, match=str(binary)):
            await spawner.spawn([str(binary)], env={})


async def test_what_a_killed_shim_leaves_comes_back_to_the_manager_and_is_killed() -> None:
    # A stop's SIGKILL takes the shim and its group, not a grandchild that left
    # the group: the orphan comes back to the manager (a subreaper), which
    # kills it when it finds the instance marker on it.
    assert set_child_subreaper()
    env = {"PATH": os.environ["PATH"], "TEISUP_INSTANCE": "x"}
    async with ProcessSpawner() as spawner:
        proc = await spawner.spawn(["sh", "-c", f"{DETACH}; exec sleep 1000"], env=env)
        async with pipe(proc.stdout) as out:
            detached = int(await read_line(out))
        assert kill_group(proc.pid, signal.SIGKILL)
        assert await wait_for_exit(proc) == -signal.SIGKILL
        assert proc_state(detached) not in (None, "Z")
        reap_adopted_orphans(spawner.owned_pids())
        with trio.fail_after(10):
            await wait_gone(detached)
        assert detached in reap_adopted_orphans(spawner.owned_pids())
        for f in (proc.stdout, proc.stderr):
            assert f is not None
            f.close()


async def test_a_child_being_spawned_is_never_taken_for_an_adopted_orphan() -> None:
    # The orphan scan runs on SIGCHLD, any time: while it scans, a spawn may
    # have exec'd a child (marker set, parent us) not yet registered as owned.
    assert set_child_subreaper()
    env = {"PATH": os.environ["PATH"], "TEISUP_INSTANCE": "x"}
    stop = False

    def scan() -> None:
        while not stop:
            spawner.reap_adopted_orphans()

    async with ProcessSpawner() as spawner:
        children: list[subprocess.Popen[bytes]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, scan)
            try:
                for _ in range(40):
                    children.append(await spawner.spawn(["sleep", "1000"], env=env))
            finally:
                stop = True
        try:
            killed = [p.pid for p in children if proc_state(p.pid) in (None, "Z")]
            assert killed == []
        finally:
            for p in children:
                kill_group(p.pid, signal.SIGKILL)
                await wait_for_exit(p)
                for f in (p.stdout, p.stderr):
                    assert f is not None
                    f.close()


async def test_a_stop_sent_while_the_shim_starts_reaches_the_instance() -> None:
    # The manager's SIGTERM goes to the group at once, before the shim has
    # started the instance: it must not be lost (the instance would live on
    # until the grace ends and SIGKILL comes).
    script = "trap 'exit 7' TERM; echo up; while :; do sleep 0.05; done"
    async with ProcessSpawner() as spawner:
        proc = await spawner.spawn(["sh", "-c", script], env={"PATH": os.environ["PATH"]})
        assert kill_group(proc.pid, signal.SIGTERM)
        with trio.fail_after(10):
            code = await wait_for_exit(proc)
        # The instance's own answer to SIGTERM (or SIGTERM itself, if it came
        # before the trap was set), passed through by the shim.
        assert code in (7, -signal.SIGTERM)
        for f in (proc.stdout, proc.stderr):
            assert f is not None
            f.close()
