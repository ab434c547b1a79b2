"""Restarts by reason come from each run's typed exit cause, not from its prose."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from teisup.grpc import BackendPool, MultiplexerService
from teisup.instances import (
    ExitCause,
    FakeNvml,
    InstanceExit,
    InstanceManager,
    InstanceSpec,
    PortAllocator,
    PortRange,
    ProcessSpawner,
    grpc_health_probe,
)
from teisup.models import ModelService
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2
from teisup.rpc import RpcStatusError
from teisup.service import ManagerConfig, SavedInstance, Snapshot, StateStatus
from teisup.service.metrics import Metrics
from teisup.service.restore import take_back
from teisup.supervision import ChildState, TransitionEvent

CAUSES = {
    "exits": InstanceExit.of_returncode(0),
    "crashes": InstanceExit.of_returncode(3, "Error: boom"),
    "is-killed": InstanceExit.of_returncode(-signal.SIGKILL),
    "hangs": InstanceExit(ExitCause.UNHEALTHY, "3 checks failed"),
    "is-slow": InstanceExit(ExitCause.STARTUP_TIMEOUT, "late"),
    "lost-its-port": InstanceExit(ExitCause.PORT_TAKEN, "port 8080 is held", port=8080),
    "cannot-spawn": InstanceExit(ExitCause.SPAWN_FAILED, "no such file"),
}


def restart(name: str, reason: str = "abnormal: unhealthy: misleading prose") -> TransitionEvent:
    return TransitionEvent(
        ("root", "instances", name), ChildState.RUNNING, ChildState.BACKOFF, reason, 1.0
    )


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("exits", "exit"),
        ("crashes", "crash"),
        ("is-killed", "signal"),
        ("hangs", "unhealthy"),
        ("is-slow", "startup_timeout"),
        ("lost-its-port", "crash"),
        ("cannot-spawn", "crash"),
        ("unknown", "other"),
    ],
)
def test_each_cause_has_its_label_whatever_the_reason_text_says(name: str, label: str) -> None:
    metrics = Metrics(instances=list, gpus=list, exit_cause=CAUSES.get)
    metrics.on_transition(restart(name))
    text = metrics.render().decode()
    assert (
        f'teisup_instance_restarts_by_reason_total{{instance="{name}",reason="{label}"}} 1.0'
        in (text)
    )
    assert f'tei_manager_instance_restarts_total{{instance="{name}"}} 1.0' in text


def test_only_an_instance_entering_backoff_counts() -> None:
    metrics = Metrics(instances=list, gpus=list, exit_cause=CAUSES.get)
    metrics.on_transition(
        TransitionEvent(
            ("root", "instances", "crashes"), ChildState.RUNNING, ChildState.STOPPED, "", 1
        )
    )
    metrics.on_transition(
        TransitionEvent(("root", "api"), ChildState.RUNNING, ChildState.BACKOFF, "", 1)
    )
    assert "teisup_instance_restarts_by_reason_total{" not in metrics.render().decode()


def test_no_series_has_a_created_twin() -> None:
    metrics = Metrics(instances=list, gpus=list, exit_cause=CAUSES.get)
    metrics.on_transition(restart("crashes"))
    metrics.created.labels("a", "m").inc()
    metrics.on_probe("a", 0.01, True, True)
    metrics.on_state_write(0.001, True)
    text = metrics.render().decode()
    assert "tei_manager_instances_created_total" in text
    assert "_created" not in text.replace("tei_manager_instances_created_total", "")


def test_start_up_polls_are_not_failed_health_checks() -> None:
    metrics = Metrics(instances=list, gpus=list)
    for _ in range(10):  # nothing listens yet: the normal wait for a model to load
        metrics.on_probe("minilm", 0.001, False, False)
    metrics.on_probe("minilm", 0.001, True, False)  # ready
    metrics.on_probe("minilm", 0.001, False, True)  # a real failure
    text = metrics.render().decode()
    assert 'tei_manager_health_check_failures_total{instance="minilm"} 1.0' in text
    count = 'teisup_health_check_duration_seconds_count{{instance="minilm",outcome="{}"}} {}'
    assert count.format("not_ready", "10.0") in text
    assert count.format("failed", "1.0") in text
    assert count.format("ok", "1.0") in text


class _Instance(msgspec.Struct, frozen=True):
    name: str
    model_id: str
    status: ChildState
    port: int = 1
    pid: int | None = None
    spec: Any = None


class _Instances:
    def all(self) -> list[_Instance]:
        return [
            _Instance("minilm", "m", ChildState.STARTING),
            _Instance("other", "m", ChildState.RUNNING),
        ]


@pytest.mark.parametrize(
    ("target", "instance", "code"),
    [
        (mux_pb2.Target(instance_name="minilm"), "minilm", "UNAVAILABLE"),
        (mux_pb2.Target(instance_name="nobody"), "", "NOT_FOUND"),
        (mux_pb2.Target(model_id="m"), "other", "OK"),
        (mux_pb2.Target(model_id="absent"), "", "NOT_FOUND"),
    ],
)
async def test_a_request_that_named_an_instance_is_counted_against_it(
    target: mux_pb2.Target, instance: str, code: str
) -> None:
    metrics = Metrics(instances=list, gpus=list)
    service = MultiplexerService(_Instances(), BackendPool(), observer=metrics)
    with contextlib.suppress(RpcStatusError), service.observe("http", "embed"):
        service.route(target)
    text = metrics.render().decode()
    expected = (
        f'teisup_requests_total{{code="{code}",instance="{instance}",method="embed",'
        'transport="http"} 1.0'
    )
    assert expected in text, text


async def test_every_instance_is_counted_created_and_the_restore_is_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="teisup")
    metrics = Metrics(instances=list, gpus=list)
    saved = [
        SavedInstance(name="old", model_id="m", port=21001, prometheus_port=27001),
        SavedInstance(
            name="parked", model_id="m", port=21002, prometheus_port=27002, desired="stopped"
        ),
    ]
    async with ProcessSpawner() as spawner:
        manager = InstanceManager(
            launcher=["true"],
            manager_id="t",
            spawner=spawner,
            ports=PortAllocator(
                instance_ports=PortRange(21000, 21099), prometheus_ports=PortRange(27000, 27099)
            ),
            gpus=FakeNvml([]),
            probe=grpc_health_probe,
        )
        config = ManagerConfig(instances=[InstanceSpec(name="seed", model_id="s")])
        state = str(tmp_path / "state.toml")
        take_back(
            manager,
            config,
            Snapshot(instances=saved),
            embedded=True,
            state_file=state,
            metrics=metrics,
        )
        assert manager.names() == ["old", "parked", "seed"]
        empty = InstanceManager(
            launcher=["true"],
            manager_id="u",
            spawner=spawner,
            ports=PortAllocator(
                instance_ports=PortRange(21100, 21199), prometheus_ports=PortRange(27100, 27199)
            ),
            gpus=FakeNvml([]),
            probe=grpc_health_probe,
        )
        take_back(empty, ManagerConfig(), Snapshot(), embedded=True, metrics=metrics)
        assert empty.names() == ["minilm"]
    text = metrics.render().decode()
    # Seeds and the packaged default are new; the restored ones are not.
    assert 'tei_manager_instances_created_total{instance="seed",model="s"} 1.0' in text
    assert (
        'tei_manager_instances_created_total{instance="minilm",'
        'model="sentence-transformers/all-MiniLM-L6-v2"} 1.0'
    ) in text
    assert 'instance="old"' not in text
    said = [r.getMessage() for r in caplog.records]
    assert f"state file {state}: restored 2 instances (1 running, 1 stopped)" in said


ROOT = Path(__file__).resolve().parents[2]
_SERIES = re.compile(r"\b(?:tei_manager|teisup)_[a-z_]+\b")


def served_series() -> tuple[set[str], set[str]]:
    """(names as the doc lists them, every sample name /metrics can serve)."""
    metrics = Metrics(instances=list, gpus=list)
    metrics.state_status = lambda: StateStatus(durable=True)
    # The model registry's series, which the service registers beside these.
    models = ModelService(ROOT, downloader=None, loader=None)  # type: ignore[arg-type]
    metrics.registry.register(models.collector())
    listed, samples = set(), set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            listed.add(f"{family.name}_total")
            samples.add(f"{family.name}_total")
        elif family.type == "histogram":
            listed.add(family.name)
            samples.update(f"{family.name}{end}" for end in ("_bucket", "_sum", "_count"))
        else:
            listed.add(family.name)
            samples.add(family.name)
    return listed, samples


def test_every_served_series_is_in_the_metrics_doc() -> None:
    doc = (ROOT / "docs" / "METRICS.md").read_text()
    listed, samples = served_series()
    in_doc = set(_SERIES.findall(doc))
    assert listed - in_doc == set(), "served but not in docs/METRICS.md"
    assert in_doc - listed - samples == set(), "in docs/METRICS.md but never served"


def test_the_grafana_dashboard_queries_served_series() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    used = {name for expr in exprs for name in _SERIES.findall(expr)}
    _, samples = served_series()
    assert used - samples == set(), "the dashboard queries series teisup does not serve"
    # Every family appears on it somewhere.
    listed, _ = served_series()
    bases = used | {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert listed - bases == set(), "series the dashboard leaves out"
