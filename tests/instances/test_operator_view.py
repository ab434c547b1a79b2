"""What an operator sees while an instance starts and when it fails: real processes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import trio

from teisup.instances import InstanceInfo, InstanceManager, InstanceSpec, RestartPolicy
from teisup.instances.startup import Phase
from teisup.supervision import Backoff, ChildState

from ..supervision.helpers import wait_for
from .conftest import running_manager

EMBEDDED = [sys.executable, "-m", "teisup.embedded"]
#: A budget that a permanent error must not spend.
GENEROUS = RestartPolicy(max_restarts=5, backoff=Backoff(initial=0.05, maximum=0.1))


async def test_a_slow_start_reports_its_phases_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="teisup")
    seen: list[tuple[Phase, InstanceInfo]] = []
    holder: list[InstanceManager] = []

    def on_phase(name: str, phase: Phase) -> None:
        seen.append((phase, holder[0].get(name)))

    env = {"FAKE_TEI_START_DELAY": "1.0"}
    with trio.fail_after(60):
        async with running_manager(tmp_path, env=env, on_phase=on_phase) as manager:
            holder.append(manager)
            with manager.supervisor.events.subscribe() as events:
                await manager.create(InstanceSpec(name="slow", model_id="BAAI/bge-small-en-v1.5"))
                await wait_for(events, "slow", ChildState.RUNNING)
            ready = manager.get("slow")
    phases = [phase for phase, _ in seen]
    assert phases == [Phase.SPAWNED, Phase.LOADING, Phase.WARMING_UP, Phase.READY]
    # GET /instances/{name} shows each phase while it lasts, with the time since spawn.
    assert [info.phase for _, info in seen] == phases
    elapsed = [info.phase_elapsed_secs for _, info in seen]
    assert all(e is not None for e in elapsed)
    assert elapsed == sorted(elapsed)  # type: ignore[type-var]
    assert elapsed[2] is not None
    assert elapsed[2] >= 1.0
    assert ready.phase is Phase.READY
    assert ready.last_error is None
    # The instance's own start-up lines are in the manager's log at INFO, tagged.
    said = [r for r in caplog.records if getattr(r, "instance", None) == "slow" and r.levelno == 20]
    events_ = [getattr(r, "event", None) for r in said]
    for event in ("spawned", "loading", "warming_up", "ready"):
        assert event in events_
    loading = next(r for r in said if getattr(r, "event", None) == "loading")
    assert loading.getMessage() == "instance slow: Starting model backend"
    assert getattr(loading, "pid", None) == ready.pid
    assert getattr(loading, "model_id", None) == "BAAI/bge-small-en-v1.5"
    # Instance transitions are INFO; internal ones of the instances supervisor
    # itself are not logged here at all.
    transitions = [r for r in said if getattr(r, "event", None) == "transition"]
    assert [getattr(r, "state", None) for r in transitions][:2] == ["starting", "running"]


async def test_a_model_not_on_the_machine_fails_after_one_attempt(tmp_path: Path) -> None:
    spec = InstanceSpec(name="absent", model_id="nobody/no-such-model", restart=GENEROUS)
    with trio.fail_after(60):
        async with running_manager(tmp_path, launcher=EMBEDDED) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec)
                failed = await wait_for(events, "absent", ChildState.FAILED)
            info = manager.get("absent")
    assert (info.status, info.restarts, info.restarts_in_window) == (ChildState.FAILED, 0, 0)
    assert "not restarted: the error is permanent" in failed.reason
    assert info.last_error == (
        "model 'nobody/no-such-model' is not available offline (no network access is attempted)"
    )
    assert info.last_exit is not None
    assert info.last_exit.permanent
    assert info.last_exit.detail == f"exited with code 1: {info.last_error}"
    assert "Args {" not in info.last_exit.detail
    assert info.last_exit_code == 1
    assert info.last_exit_at is not None
    assert info.phase is None
    # The full tail stays in the logs.
    texts = [line.text for line in manager.logs("absent")]
    assert "Error: Could not download model artifacts" in texts
    assert any("looked in:" in text for text in texts)


async def test_a_bad_flag_fails_after_one_attempt(tmp_path: Path) -> None:
    spec = InstanceSpec(
        name="typo",
        model_id="BAAI/bge-small-en-v1.5",
        extra_args=["--no-such-flag"],
        restart=GENEROUS,
    )
    with trio.fail_after(60):
        async with running_manager(tmp_path) as manager:
            with manager.supervisor.events.subscribe() as events:
                await manager.create(spec)
                await wait_for(events, "typo", ChildState.FAILED)
            info = manager.get("typo")
    assert (info.restarts, info.last_exit_code) == (0, 2)
    assert info.last_error is not None
    assert "--no-such-flag" in info.last_error
    assert "usage" not in info.last_error
