"""The instances layer: TEI (or the embedded backend) as supervised OS processes.

`InstanceManager` is the front door; `InstanceRunner` is one instance's
supervised worker; `spec`, `launch`, `health`, `startup` are pure; `process`, `ports`,
`gpus`, `logs` are the thin I/O edges (each with a seam for tests).
"""

from .exits import ExitCause, InstanceExit
from .gpus import FakeNvml, GpuInfo, InvalidGpuId, NvmlReader, PynvmlReader, validate_gpu_id
from .health import HealthPolicy, HealthSettings, Verdict
from .identity import PortOwner
from .launch import INSTANCE_MARKER, MANAGER_MARKER
from .logs import InstanceLog, LogLine
from .manager import (
    Desired,
    InstanceExists,
    InstanceInfo,
    InstanceManager,
    InstanceNotFound,
    InstanceRecord,
    LauncherError,
    MaxInstancesReached,
    resolve_launcher,
)
from .ports import PortAllocator, PortError, PortRange, PortRangeExhausted, Ports, PortUnavailable
from .probe import grpc_health_probe
from .process import (
    ProcessSpawner,
    kill_group,
    set_child_subreaper,
    sweep_leftovers,
    wait_for_exit,
)
from .runner import InstanceRunner, PhaseListener, Probe, RunStatus
from .spec import (
    MAX_SECONDS,
    NAME_PATTERN,
    InstanceSpec,
    RestartPolicy,
    check_bounds,
    spec_from_dict,
    worded_error,
)
from .startup import Phase

__all__ = [
    "INSTANCE_MARKER",
    "MANAGER_MARKER",
    "MAX_SECONDS",
    "NAME_PATTERN",
    "Desired",
    "ExitCause",
    "FakeNvml",
    "GpuInfo",
    "HealthPolicy",
    "HealthSettings",
    "InstanceExists",
    "InstanceExit",
    "InstanceInfo",
    "InstanceLog",
    "InstanceManager",
    "InstanceNotFound",
    "InstanceRecord",
    "InstanceRunner",
    "InstanceSpec",
    "InvalidGpuId",
    "LauncherError",
    "LogLine",
    "MaxInstancesReached",
    "Phase",
    "PhaseListener",
    "NvmlReader",
    "PortAllocator",
    "PortOwner",
    "PortError",
    "PortRange",
    "PortRangeExhausted",
    "PortUnavailable",
    "Ports",
    "Probe",
    "ProcessSpawner",
    "PynvmlReader",
    "RestartPolicy",
    "RunStatus",
    "Verdict",
    "resolve_launcher",
    "check_bounds",
    "grpc_health_probe",
    "kill_group",
    "set_child_subreaper",
    "spec_from_dict",
    "sweep_leftovers",
    "validate_gpu_id",
    "worded_error",
    "wait_for_exit",
]
