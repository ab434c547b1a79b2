"""Readiness and liveness of one instance's process, as a pure object.

Two budgets, as Kubernetes separates startup and liveness probes: while the
instance starts (downloading and loading a model, warming up), failed probes
only matter once the start-up budget is spent; once it has been ready, a run
of consecutive failed probes marks it unhealthy and then restarts it. A
process that is alive but hung (SIGSTOP) is found this way, since only an exit
is noticed without probing.
"""

from __future__ import annotations

import enum
import math

import msgspec

__all__ = ["HealthPolicy", "HealthSettings", "Verdict"]


class HealthSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How an instance is probed (``health_check_interval_secs`` and friends)."""

    #: Seconds between liveness probes once ready.
    interval: float = 10.0
    #: Seconds a probe may take before it counts as failed.
    timeout: float = 5.0
    #: Consecutive failed probes that make a ready instance restart. The first
    #: failure already shows it ``unhealthy``. 0: failed probes never restart
    #: it (tei-manager's documented meaning of 0).
    failure_threshold: int = 3
    #: Seconds between readiness probes while starting (the ``Ready`` log line
    #: triggers one at once as well).
    ready_poll_interval: float = 1.0

    def __post_init__(self) -> None:
        for name in ("interval", "timeout", "ready_poll_interval"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.failure_threshold < 0:
            raise ValueError(f"failure_threshold must be >= 0, got {self.failure_threshold}")


class Verdict(enum.Enum):
    """What a probe result means for the instance."""

    #: Still starting, within budget: keep waiting.
    WAIT = "wait"
    #: The first successful probe: report ready.
    READY = "ready"
    #: Ready and answering.
    HEALTHY = "healthy"
    #: Ready, but this probe failed; not yet at the threshold.
    DEGRADED = "degraded"
    #: Too many consecutive failures: restart it.
    RESTART = "restart"
    #: The start-up budget is spent without a successful probe.
    STARTUP_TIMEOUT = "startup_timeout"


class HealthPolicy:
    """Turns probe results into verdicts; ``now`` is monotonic seconds."""

    def __init__(self, settings: HealthSettings, *, startup_timeout: float, started_at: float):
        self.settings = settings
        self.deadline = started_at + startup_timeout
        self.ready = False
        self.consecutive_failures = 0
        self.last_success: float | None = None
        self.last_error = ""

    def on_probe(self, ok: bool, now: float, error: str = "") -> Verdict:
        """Record one probe's result and say what follows."""
        if ok:
            self.consecutive_failures = 0
            self.last_success = now
            if not self.ready:
                self.ready = True
                return Verdict.READY
            return Verdict.HEALTHY
        self.last_error = error
        if not self.ready:
            return Verdict.STARTUP_TIMEOUT if now >= self.deadline else Verdict.WAIT
        self.consecutive_failures += 1
        threshold = self.settings.failure_threshold
        if threshold and self.consecutive_failures >= threshold:
            return Verdict.RESTART
        return Verdict.DEGRADED

    def next_probe_after(self) -> float:
        """Seconds until the next probe."""
        return self.settings.interval if self.ready else self.settings.ready_poll_interval
