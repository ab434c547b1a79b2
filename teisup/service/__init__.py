"""The running service: configuration, state, metrics, and the root supervisor that runs it all.

`Service` is the composition root (`service.py`), built from a
`ManagerConfig` (`config.py`, `load_config`); its parts are made in
`wiring.py`, the saved instances are taken back in `restore.py`, the root's
small workers are in `workers.py`, and `control.py` is what the front ends
see (`ServiceControl`, `GrpcGate`). State snapshots: `StateStore`
(`state.py`) and `StateWriter` (`writer.py`). Other packages import from here.
"""

from .config import ENVIRONMENT, TLS_ENVIRONMENT, ConfigError, ManagerConfig, load_config
from .control import GrpcGate, ServiceControl
from .metrics import Metrics
from .service import Service
from .state import CorruptState, LoadResult, SavedInstance, Snapshot, StateStore
from .writer import RetrySchedule, StateStatus, StateWriter

__all__ = [
    "ENVIRONMENT",
    "TLS_ENVIRONMENT",
    "ConfigError",
    "CorruptState",
    "GrpcGate",
    "LoadResult",
    "ManagerConfig",
    "Metrics",
    "RetrySchedule",
    "SavedInstance",
    "Service",
    "ServiceControl",
    "Snapshot",
    "StateStatus",
    "StateStore",
    "StateWriter",
    "load_config",
]
