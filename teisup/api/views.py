"""An instance as the REST API shows it: tei-manager's fields with its values, then teisup's.

Typed clients of tei-manager 0.12 decode ``status`` into a five-value enum and
``uptime_secs`` into an unsigned integer, and reject anything else. teisup's
supervisor knows more (an instance whose probes fail, one waiting out a
restart backoff) and measures uptime in fractions of a second, so those go
in fields of their own beside tei-manager's: ``state`` and ``uptime_seconds``.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from ..instances import InstanceInfo
from ..supervision import ChildState

__all__ = ["Status", "instance_schema", "instance_view"]


class Status(enum.Enum):
    """tei-manager's instance status, every value it can answer."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


#: teisup's state -> what tei-manager would answer for that instance.
STATUS_OF: dict[ChildState, Status] = {
    ChildState.STOPPED: Status.STOPPED,
    ChildState.STARTING: Status.STARTING,
    ChildState.RUNNING: Status.RUNNING,
    # tei-manager keeps a process that fails its probes "running" and counts
    # health_check_failures, which InstanceInfo carries too.
    ChildState.UNHEALTHY: Status.RUNNING,
    ChildState.STOPPING: Status.STOPPING,
    # Exited and coming back by itself: tei-manager shows a restart as starting.
    ChildState.BACKOFF: Status.STARTING,
    ChildState.FAILED: Status.FAILED,
}

#: teisup's own fields, each placed right after the tei-manager field it refines.
_BESIDE = {"status": "state", "uptime_secs": "uptime_seconds"}


def instance_view(info: InstanceInfo, **extra: Any) -> dict[str, Any]:
    """``info`` as JSON-ready builtins, tei-manager's fields first, then ``extra``."""
    fields = msgspec.to_builtins(info)
    uptime = info.uptime_secs
    refined = {
        "status": STATUS_OF[info.status].value,
        "state": info.status.value,
        # 0, not null, when it is not running: a client may declare tei-manager's
        # field a plain u64, which null would not decode into.
        "uptime_secs": 0 if uptime is None else int(uptime),
        "uptime_seconds": uptime,
    }
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in _BESIDE:
            out[key] = refined[key]
            out[_BESIDE[key]] = refined[_BESIDE[key]]
        else:
            out[key] = value
    out.update(extra)
    return out


def instance_schema(generated: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of `instance_view`'s answer, from msgspec's one of InstanceInfo."""
    properties: dict[str, Any] = {}
    for key, schema in generated["properties"].items():
        if key == "status":
            properties["status"] = {
                "type": "string",
                "enum": [s.value for s in Status],
                "description": "tei-manager's status (unhealthy shows running, backoff starting)",
            }
            properties["state"] = {**schema, "description": "teisup's supervisor state"}
        elif key == "uptime_secs":
            properties["uptime_secs"] = {
                "type": "integer",
                "minimum": 0,
                "description": "whole seconds since ready, 0 when not running (tei-manager's u64)",
            }
            properties["uptime_seconds"] = {**schema, "description": "seconds since ready"}
        else:
            properties[key] = schema
    required = []
    for key in generated.get("required", []):
        required.append(key)
        if key in _BESIDE:
            required.append(_BESIDE[key])
    return {**generated, "properties": properties, "required": required}
