"""Instances end to end: real processes (the TEI test double), real sockets, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from teisup.instances import (
    Desired,
    FakeNvml,
    InstanceExists,
    InstanceNotFound,
    InstanceSpec,
    InvalidGpuId,
    LauncherError,
    PortUnavailable,
    RestartPolicy,
    resolve_launcher,
)
from teisup.instances.process import proc_state
from teisup.rpc import fetch_info
from teisup.supervision import Backoff, ChildState, RestartType

from ..supervision.helpers import wait_for
from .conftest import free_ports, running_manager, wait_gone

QUICK = RestartPolicy(backoff=Backoff(initial=0.1, maximum=1.0))


def spec(name: str = "bge-small", **kwargs: object) -> InstanceSpec:
    kwargs.setdefault("restart", QUICK)
    kwargs.setdefault("stop_grace_secs", 5.0)
    return InstanceSpec(name=name, model_id="BAAI/bge-small-en-v1.5", **kwargs)  # type: ignore[arg-type]


def alive(pid: int | None) -> bool:
    return pid is not None and proc_state(pid) not in (None, "Z")


async def test_an_instance_runs_answers_and_stops(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path) as manager:
            with manager.supervisor.events.subscribe() as events:
                info = await manager.create(spec())
                assert info.status == ChildState.STARTING
                await wait_for(events, "bge-small", ChildState.RUNNING)
            info = manager.get("bge-small")
            assert (info.status, info.restarts) == (ChildState.RUNNING, 0)
            assert info.port in manager.ports.instance_ports
            assert alive(info.pid)
            assert info.pid is not None
            answer = await fetch_info("127.0.0.1", info.port, timeout=5)
            assert answer.model_id == "BAAI/bge-small-en-v1.5"
            # Loopback only, the manager's own flags, and the marker variables.
            cmdline = (await trio.Path(f"/proc/{info.pid}/cmdline").read_bytes()).split(b"\0")
            assert cmdline[cmdline.index(b"--hostname") + 1] == b"127.0.0.1"
            environ = (await trio.Path(f"/proc/{info.pid}/environ").read_bytes()).split(b"\0")
            assert f"TEISUP_OWNED_BY={manager.manager_id}".encode() in environ
            assert b"NO_COLOR=1" in environ
            assert os.getpgid(info.pid) == info.pid  # its own process group

            # Starting a running instance is a no-op: no second process.
            assert (await manager.start("bge-small")).pid == info.pid

            stopped = await manager.stop("bge-small")
            assert (stopped.status, stopped.pid) == (ChildState.STOPPED, None)
            assert proc_state(info.pid) is None
            assert stopped.last_exit is not None
            assert stopped.last_exit.kind.value == "shutdown"
            assert stopped.last_exit.detail == "terminated on request; stopped"
            assert (await manager.stop("bge-small")).status == ChildState.STOPPED
            assert any(line.message == "Ready" for line in manager.logs("bge-small"))
            assert (tmp_path / "bge-small.log").read_text().count("Ready") == 1


async def test_a_crash_is_restarted_after_a_backoff(tmp_path: Path) -> None:
    with trio.fail_after(30):
        # The double crashes 1 s after it starts, ready or not: on a loaded
        # machine it may not have reached running by then, so the first crash
        # is awaited whatever came before it, and running only afterwards.
        async with running_manager(tmp_path, env={"FAKE_TEI_CRASH_AFTER": "1"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec())
                backoff = await wait_for(events, "bge-small", ChildState.BACKOFF)
                assert "exited with code 1" in backoff.reason
                assert "restart in 0.1s" in backoff.reason  # the first step
                again = (await wait_for(events, "bge-small", ChildState.STARTING)).time
                assert again - backoff.time >= 0.1
                await wait_for(events, "bge-small", ChildState.RUNNING)
            assert manager.get("bge-small").restarts >= 1


async def test_a_model_that_cannot_load_ends_failed_with_the_reason(tmp_path: Path) -> None:
    policy = RestartPolicy(max_restarts=2, backoff=Backoff(initial=0.05, maximum=0.1))
    with trio.fail_after(30):
        async with running_manager(tmp_path, env={"FAKE_TEI_FAIL_START": "1"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(restart=policy))
                failed = await wait_for(events, "bge-small", ChildState.FAILED)
            info = manager.get("bge-small")
            assert info.status == ChildState.FAILED
            assert info.restarts == 2  # three runs in all
            assert info.last_exit is not None
            # The process's own words: the cause, not the context around it.
            cause = "request error: BAAI/bge-small-en-v1.5 is not a valid model id"
            assert info.last_exit.detail.startswith(f"exited with code 1: {cause}")
            assert info.last_error is not None
            assert info.last_error.startswith(cause)
            assert (info.last_exit_code, info.last_exit_signal) == (1, None)
            assert info.last_exit_at is not None
            assert info.restarts_in_window == info.restarts
            assert "gave up after 2 restarts" in failed.reason
            assert info.pid is None
            # Starting it again is the way out of failed, with a clean history.
            with manager.supervisor.events.subscribe() as events:
                await manager.start("bge-small")
                await wait_for(events, "bge-small", ChildState.BACKOFF)
            assert manager.get("bge-small").restarts_in_window == 1


async def test_a_transient_instance_that_exits_0_stays_stopped(tmp_path: Path) -> None:
    env = {"FAKE_TEI_CRASH_AFTER": "0.2", "FAKE_TEI_EXIT_CODE": "0"}
    transient = RestartPolicy(type=RestartType.TRANSIENT, backoff=Backoff(initial=0.1))
    with trio.fail_after(30):
        async with running_manager(tmp_path, env=env) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(restart=transient))
                await wait_for(events, "bge-small", ChildState.RUNNING)
                event = await wait_for(events, "bge-small", ChildState.STOPPED)
            # A probe may catch it closing its socket just before it exits.
            assert event.old in (ChildState.RUNNING, ChildState.UNHEALTHY)
            info = manager.get("bge-small")
            assert (info.status, info.restarts) == (ChildState.STOPPED, 0)
            assert info.last_exit is not None
            assert info.last_exit.detail == "exited with code 0"


async def test_a_hung_process_is_found_unhealthy_and_restarted(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec())
                await wait_for(events, "bge-small", ChildState.RUNNING)
                hung = manager.get("bge-small").pid
                assert hung is not None
                # The whole instance (the pid shown is its shim): alive, answering nothing.
                os.killpg(hung, signal.SIGSTOP)
                unhealthy = await wait_for(events, "bge-small", ChildState.UNHEALTHY)
                assert "health check failed (1)" in unhealthy.reason
                backoff = await wait_for(events, "bge-small", ChildState.BACKOFF)
                assert "unhealthy: 2 consecutive health checks failed" in backoff.reason
                await wait_for(events, "bge-small", ChildState.RUNNING)
            assert proc_state(hung) is None
            fresh = manager.get("bge-small")
            assert fresh.pid != hung
            assert alive(fresh.pid)


async def test_an_instance_ignoring_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path, env={"FAKE_TEI_IGNORE_SIGTERM": "1"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(stop_grace_secs=0.5))
                await wait_for(events, "bge-small", ChildState.RUNNING)
            pid = manager.get("bge-small").pid
            assert pid is not None
            began = trio.current_time()
            info = await manager.stop("bge-small")
            assert trio.current_time() - began >= 0.5
            assert info.last_exit is not None
            assert info.last_exit.detail == "terminated on request; killed after 0.5s grace"
            assert proc_state(pid) is None


async def test_a_grandchild_dies_with_its_parent(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path, env={"FAKE_TEI_GRANDCHILD": "1"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec())
                await wait_for(events, "bge-small", ChildState.RUNNING)
            [grandchild] = [
                int(m.group(1))
                for line in manager.logs("bge-small")
                if (m := re.fullmatch(r"grandchild (\d+)", line.message or ""))
            ]
            assert alive(grandchild)
            await manager.stop("bge-small")
            await wait_gone(grandchild)
            assert not alive(grandchild)


async def test_bad_requests_are_refused_and_leave_nothing_behind(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path, gpus=FakeNvml([])) as manager:
            with socket.socket() as taken:
                taken.bind(("0.0.0.0", 0))
                taken.listen()
                port = taken.getsockname()[1]
                with pytest.raises(PortUnavailable, match=str(port)):
                    await manager.create(spec(port=port))
            with pytest.raises(InvalidGpuId, match="no GPU"):
                await manager.create(spec(gpu_id=0))
            assert manager.names() == []
            await manager.create(spec(), start=False)
            with pytest.raises(InstanceExists, match="bge-small"):
                await manager.create(spec())
            with pytest.raises(InstanceNotFound, match="nope"):
                await manager.start("nope")
            assert manager.get("bge-small").status == ChildState.STOPPED
            await manager.delete("bge-small")
            assert manager.names() == []


async def test_an_out_of_range_gpu_is_refused_naming_the_valid_ones(tmp_path: Path) -> None:
    async with running_manager(tmp_path, gpus=FakeNvml.with_gpus(2)) as manager:
        with pytest.raises(InvalidGpuId, match="5"):
            await manager.create(spec(gpu_id=5), start=False)
        info = await manager.create(spec(gpu_id=1), start=False)
        assert info.gpu_id == 1


async def test_kill_9_of_the_manager_leaves_no_process_of_any_instance_tree(
    tmp_path: Path,
) -> None:
    manager_id = f"test-kill9-{os.getpid()}"
    script = Path(__file__).with_name("orphan_check_manager.py")
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                proc: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        [sys.executable, str(script), manager_id, str(tmp_path), "3"],
                        stdout=subprocess.PIPE,
                        check=False,
                    )
                )
                assert proc.stdout is not None
                line = b""
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some()
                    assert chunk, "the manager exited before its instances ran"
                    line += chunk
                report = json.loads(line)
                trees = {name: set(pids["tree"]) for name, pids in report.items()}
                for name, pids in report.items():
                    # Both grandchildren are in the tree, and one has left the
                    # instance's process group: a group kill cannot reach it.
                    assert {pids["pid"], pids["grandchild"], pids["detached"]} <= trees[name]
                    assert os.getpgid(pids["detached"]) != pids["pid"]
                    assert all(alive(pid) for pid in trees[name])
                proc.kill()  # SIGKILL: no handler, no cleanup
                assert await proc.wait() == -signal.SIGKILL

        # Every process of every instance's tree goes with the manager,
        # promptly, and with no successor's sweep to help.
        with trio.move_on_after(15):
            for pid in set().union(*trees.values()):
                await wait_gone(pid)
        assert not [pid for tree in trees.values() for pid in tree if alive(pid)]
    finally:
        async with running_manager(tmp_path, manager_id=manager_id) as successor:
            swept = await successor.sweep_leftovers(grace=0.5)  # cleans up after a failure
    assert swept == []


async def test_an_instance_not_ready_within_its_budget_is_restarted(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path, env={"FAKE_TEI_START_DELAY": "60"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(startup_timeout_secs=0.5))
                backoff = await wait_for(events, "bge-small", ChildState.BACKOFF)
            assert "not ready within 0.5s" in backoff.reason
            assert backoff.old is ChildState.STARTING  # never reported ready


async def test_delete_stops_the_process_and_frees_its_ports(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path) as manager:
            port, prometheus_port = free_ports(2)
            with manager.supervisor.events.subscribe() as events:
                info = await manager.create(spec(port=port, prometheus_port=prometheus_port))
                await wait_for(events, "bge-small", ChildState.RUNNING)
            pid = manager.get("bge-small").pid
            assert (tmp_path / "bge-small.log").exists()
            await manager.delete("bge-small")
            assert not (tmp_path / "bge-small.log").exists()  # its log goes with it
            assert pid is not None
            assert proc_state(pid) is None
            assert manager.names() == []
            with pytest.raises(InstanceNotFound):
                manager.get("bge-small")
            again = await manager.create(
                spec("other", port=info.port, prometheus_port=prometheus_port), start=False
            )
            assert again.port == port


def test_the_launcher_is_tei_when_found_else_the_embedded_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = tmp_path / "text-embeddings-router"
    router.write_text("#!/bin/sh\n")
    router.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_launcher(None) == [str(router)]
    assert resolve_launcher("") == [str(router)]
    assert resolve_launcher(str(router)) == [str(router)]
    assert resolve_launcher("text-embeddings-router") == [str(router)]
    monkeypatch.setenv("PATH", "/nonexistent")
    assert resolve_launcher(None) == [sys.executable, "-m", "teisup.embedded"]


def test_a_configured_binary_that_cannot_run_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never the embedded backend instead: a typo would serve another model.
    monkeypatch.setenv("PATH", "/nonexistent")
    plain = tmp_path / "router"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    cases = {
        "/opt/tei/missing": "/opt/tei/missing: no such file",
        str(tmp_path): f"{tmp_path}: not a regular file",
        str(plain): f"{plain}: not executable",
        "text-embeddings-router": "'text-embeddings-router': not found on PATH",
    }
    for configured, why in cases.items():
        with pytest.raises(LauncherError) as caught:
            resolve_launcher(configured)
        assert str(caught.value) == f"TEI binary {why}"


async def test_a_stopped_instance_stays_stopped_and_manual_starts_are_not_restarts(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec())
                await wait_for(events, "bge-small", ChildState.RUNNING)
                await manager.stop("bge-small")
                # Several probe intervals pass: nothing starts it again.
                with trio.move_on_after(1.0):
                    await wait_for(events, "bge-small", ChildState.STARTING)
                    raise AssertionError("a stopped instance was started again")
                await manager.start("bge-small")
                await wait_for(events, "bge-small", ChildState.RUNNING)
                await manager.restart("bge-small")
                await wait_for(events, "bge-small", ChildState.RUNNING)
            info = manager.get("bge-small")
            assert (info.status, info.restarts, info.desired) == (
                ChildState.RUNNING,
                0,
                Desired.RUNNING,
            )


async def test_backoff_is_visible_with_its_next_attempt(tmp_path: Path) -> None:
    slow = RestartPolicy(backoff=Backoff(initial=30.0, maximum=60.0))
    with trio.fail_after(30):
        async with running_manager(tmp_path, env={"FAKE_TEI_FAIL_START": "1"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(restart=slow))
                await wait_for(events, "bge-small", ChildState.BACKOFF)
            info = manager.get("bge-small")
            assert info.status == ChildState.BACKOFF
            assert info.next_restart_in is not None
            assert 25.0 < info.next_restart_in <= 30.0
            # Stopping it cancels the pending restart.
            assert (await manager.stop("bge-small")).status == ChildState.STOPPED


async def test_start_while_stopping_is_not_lost(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_manager(tmp_path, env={"FAKE_TEI_IGNORE_SIGTERM": "1"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(stop_grace_secs=0.5))
                await wait_for(events, "bge-small", ChildState.RUNNING)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(manager.stop, "bge-small")
                    await wait_for(events, "bge-small", ChildState.STOPPING)
                    nursery.start_soon(manager.start, "bge-small")
                await wait_for(events, "bge-small", ChildState.RUNNING)
            info = manager.get("bge-small")
            assert (info.status, info.desired) == (ChildState.RUNNING, Desired.RUNNING)


async def test_ready_logged_before_the_port_is_bound_still_ends_running(tmp_path: Path) -> None:
    # Real TEI logs Ready just before it binds: the probe the Ready line
    # triggers can be refused, and the next poll finds it listening.
    with trio.fail_after(30):
        async with running_manager(tmp_path, env={"FAKE_TEI_READY_EARLY": "0.5"}) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec())
                running = await wait_for(events, "bge-small", ChildState.RUNNING)
            assert running.old is ChildState.STARTING
            assert manager.get("bge-small").restarts == 0


async def test_a_kill_after_the_grace_takes_grandchildren_that_left_the_group(
    tmp_path: Path,
) -> None:
    # No orphan reaper runs here: the kill itself must reach the whole tree.
    env = {"FAKE_TEI_IGNORE_SIGTERM": "1", "FAKE_TEI_DETACHED_GRANDCHILD": "1"}
    with trio.fail_after(30):
        async with running_manager(tmp_path, env=env) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec(stop_grace_secs=0.5))
                await wait_for(events, "bge-small", ChildState.RUNNING)
            [detached] = [
                int(m.group(1))
                for line in manager.logs("bge-small")
                if (m := re.fullmatch(r"detached grandchild (\d+)", line.message or ""))
            ]
            assert alive(detached)
            info = await manager.stop("bge-small")
            assert info.last_exit is not None
            assert "killed after 0.5s grace" in info.last_exit.detail
            await wait_gone(detached)
            assert not alive(detached)
