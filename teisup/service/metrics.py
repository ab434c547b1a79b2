"""The manager's own Prometheus metrics.

tei-manager's five series keep their names and labels, so existing dashboards
work, and each is actually recorded (tei-manager never increments its
health-check failure counter, and counts only health-triggered restarts).
teisup adds per-state instance gauges, restarts by reason, backoff seconds,
probe latency, state-write duration and failures, whether the state file holds
every change (and for how long it has not), and per-GPU readings; and,
for the data plane (gRPC multiplexer and HTTP), requests by transport, method,
instance and status code, their latency, calls in flight per instance, and
rows per Arrow request.

Values that are state (instance states, backoff, GPUs) are read at scrape
time by a collector, so they can never drift from the truth. No counter or
histogram has a ``_created`` series: they double the output and no dashboard
reads them. docs/METRICS.md lists every series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..grpc import RequestRecord
from ..instances import ExitCause, GpuInfo, InstanceExit, InstanceInfo
from ..supervision import ChildState, TransitionEvent
from .writer import StateStatus

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A process-wide switch of prometheus_client (as PROMETHEUS_DISABLE_CREATED_SERIES
# is): teisup's registries are the only ones it serves.
disable_created_metrics()  # type: ignore[no-untyped-call]


#: The ``reason`` label of ``teisup_instance_restarts_by_reason`` for each cause.
#: A port taken by another process counts as the crash it is (or would be).
RESTART_REASONS: Mapping[ExitCause, str] = {
    ExitCause.EXITED: "exit",
    ExitCause.CRASHED: "crash",
    ExitCause.PERMANENT_ERROR: "crash",
    ExitCause.KILLED: "signal",
    ExitCause.UNHEALTHY: "unhealthy",
    ExitCause.STARTUP_TIMEOUT: "startup_timeout",
    ExitCause.PORT_TAKEN: "crash",
    ExitCause.SPAWN_FAILED: "crash",
    ExitCause.ERROR: "crash",
}


def restart_reason(exit: InstanceExit | None) -> str:
    """A low-cardinality label for why an instance is being restarted."""
    return RESTART_REASONS.get(exit.cause, "other") if exit is not None else "other"


class Metrics:
    """Every series of the manager, in one registry."""

    def __init__(
        self,
        *,
        instances: Callable[[], list[InstanceInfo]],
        gpus: Callable[[], list[GpuInfo]],
        exit_cause: Callable[[str], InstanceExit | None] = lambda name: None,
    ) -> None:
        """``exit_cause(name)``: how the instance's last run ended (the manager's
        `InstanceManager.last_exit_cause`), read when a restart is counted."""
        self.registry = CollectorRegistry()
        self._exit_cause = exit_cause
        r = self.registry
        self.created = Counter(
            "tei_manager_instances_created",
            "Instances created: by the API, from the configuration and the packaged default "
            "(instances restored from the state file are not new)",
            ["instance", "model"],
            registry=r,
        )
        self.deleted = Counter(
            "tei_manager_instances_deleted", "Instances deleted", ["instance"], registry=r
        )
        self.restarts = Counter(
            "tei_manager_instance_restarts",
            "Instance restarts, whatever their cause",
            ["instance"],
            registry=r,
        )
        self.health_failures = Counter(
            "tei_manager_health_check_failures",
            "Failed health checks of ready instances",
            ["instance"],
            registry=r,
        )
        self.count = Gauge("tei_manager_instances_count", "Instances managed", registry=r)
        self.restarts_by_reason = Counter(
            "teisup_instance_restarts_by_reason",
            "Instance restarts by cause",
            ["instance", "reason"],
            registry=r,
        )
        self.probe_seconds = Histogram(
            "teisup_health_check_duration_seconds",
            "Health check latency; outcome ok, failed (a ready instance did not answer) or "
            "not_ready (a poll while it starts)",
            ["instance", "outcome"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.state_write_seconds = Histogram(
            "teisup_state_write_duration_seconds",
            "Time to write a state snapshot durably",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.state_write_failures = Counter(
            "teisup_state_write_failures", "Failed state snapshot writes", registry=r
        )
        self.state_restore = Counter(
            "teisup_state_restore",
            "State loads at start-up by source (file, backup, missing, unreadable)",
            ["source"],
            registry=r,
        )
        self.requests = Counter(
            "teisup_requests",
            "Data-plane requests by transport (grpc, http), method, instance and gRPC status "
            "code; instance is empty when refused before routing",
            ["transport", "method", "instance", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "teisup_request_duration_seconds",
            "Data-plane request latency, from arrival to answer",
            ["transport", "method", "instance"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.arrow_rows = Histogram(
            "teisup_arrow_rows",
            "Rows per Arrow batch request",
            ["method", "instance"],
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000, 100000),
            registry=r,
        )
        #: Calls in flight on an instance (set by the service to its backend pool's count).
        self.in_flight: Callable[[str], int] = lambda name: 0
        #: Whether the state file holds every change (set by the service to its writer's).
        self.state_status: Callable[[], StateStatus | None] = lambda: None
        r.register(_StateCollector(instances, gpus, lambda name: self.in_flight(name)))
        r.register(_DurabilityCollector(lambda: self.state_status()))
        self._instances = instances

    def render(self) -> bytes:
        self.count.set(len(self._instances()))
        return generate_latest(self.registry)

    def on_transition(self, event: TransitionEvent) -> None:
        """Count restarts from the supervision tree's transitions."""
        is_instance = len(event.path) == 3 and event.path[1] == "instances"
        if is_instance and event.new is ChildState.BACKOFF and event.old is not ChildState.BACKOFF:
            self.restarts.labels(event.child_id).inc()
            # The run that just ended recorded its cause before its task
            # returned, so it is there by the time this transition is read.
            reason = restart_reason(self._exit_cause(event.child_id))
            self.restarts_by_reason.labels(event.child_id, reason).inc()

    def on_probe(self, instance: str, seconds: float, ok: bool, ready: bool) -> None:
        """Time one probe; only a ready instance's failed probe is a failed health check
        (a start-up poll that finds nothing listening yet is the normal wait)."""
        outcome = "ok" if ok else "failed" if ready else "not_ready"
        self.probe_seconds.labels(instance, outcome).observe(seconds)
        if ready and not ok:
            self.health_failures.labels(instance).inc()

    def request_done(self, record: RequestRecord) -> None:
        """Count one data-plane request (the `teisup.grpc.observe.RequestObserver` hook)."""
        labels = (record.transport, record.method, record.instance)
        self.requests.labels(*labels, record.code).inc()
        self.request_seconds.labels(*labels).observe(record.seconds)
        if record.rows is not None:
            self.arrow_rows.labels(record.method, record.instance).observe(record.rows)

    def on_state_write(self, seconds: float, ok: bool) -> None:
        self.state_write_seconds.observe(seconds)
        if not ok:
            self.state_write_failures.inc()


class _StateCollector(Collector):
    def __init__(
        self,
        instances: Callable[[], list[InstanceInfo]],
        gpus: Callable[[], list[GpuInfo]],
        in_flight: Callable[[str], int],
    ) -> None:
        self._instances = instances
        self._gpus = gpus
        self._in_flight = in_flight

    def collect(self) -> Iterable[Metric]:
        states = GaugeMetricFamily(
            "teisup_instance_state",
            "1 for the state each instance is in, 0 for the others",
            labels=["instance", "state"],
        )
        backoff = GaugeMetricFamily(
            "teisup_instance_backoff_seconds",
            "Seconds until a restarting instance is started again",
            labels=["instance"],
        )
        in_flight = GaugeMetricFamily(
            "teisup_requests_in_flight",
            "Data-plane calls holding one of an instance's max_concurrent_requests slots",
            labels=["instance"],
        )
        for info in self._instances():
            for state in ChildState:
                states.add_metric([info.name, state.value], 1.0 if info.status is state else 0)
            backoff.add_metric([info.name], info.next_restart_in or 0.0)
            in_flight.add_metric([info.name], float(self._in_flight(info.name)))
        yield states
        yield backoff
        yield in_flight
        memory = GaugeMetricFamily(
            "teisup_gpu_memory_bytes", "GPU memory by kind", labels=["gpu", "name", "kind"]
        )
        utilization = GaugeMetricFamily(
            "teisup_gpu_utilization_percent", "GPU utilization", labels=["gpu", "name"]
        )
        for gpu in self._gpus():
            for kind, value in (
                ("total", gpu.memory_total_bytes),
                ("used", gpu.memory_used_bytes),
                ("free", gpu.memory_free_bytes),
            ):
                memory.add_metric([str(gpu.index), gpu.name, kind], float(value))
            if gpu.utilization_percent is not None:
                utilization.add_metric([str(gpu.index), gpu.name], float(gpu.utilization_percent))
        yield memory
        yield utilization


class _DurabilityCollector(Collector):
    def __init__(self, status: Callable[[], StateStatus | None]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        if status is None:
            return
        yield GaugeMetricFamily(
            "teisup_state_durable",
            "1 when the state file holds every applied change, 0 while some are unsaved",
            value=1.0 if status.durable else 0.0,
        )
        yield GaugeMetricFamily(
            "teisup_state_unsaved_seconds",
            "How long the oldest change not yet in the state file has waited (0 when none)",
            value=status.pending_seconds,
        )
