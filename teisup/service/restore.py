"""State restore: saved instances and configured seeds into the manager, and the snapshot out.

At start-up `take_back` registers what the state file holds (each with its
desired state, ports and restart count), then the configuration's seeds the
file does not name, then, on a machine with nothing configured or saved and
no TEI binary, the packaged default (the root's ``restore`` child,
`InstanceManager.keep_children`, then starts the ones that should run).
`collect` is the other direction: the manager's records as a snapshot's
instances, for the state writer.
"""

from __future__ import annotations

import logging

import msgspec

from ..instances import Desired, InstanceManager, InstanceSpec
from .config import ManagerConfig
from .metrics import Metrics
from .state import SavedInstance, Snapshot, StateStore

__all__ = ["DEFAULT_INSTANCE", "collect", "load", "spec_of", "take_back"]

logger = logging.getLogger("teisup")

_SPEC_FIELDS = tuple(f for f in InstanceSpec.__struct_fields__)

#: What a bare ``teisup`` serves with no TEI binary: the packaged CPU model.
DEFAULT_INSTANCE = InstanceSpec(name="minilm", model_id="sentence-transformers/all-MiniLM-L6-v2")


def load(store: StateStore, metrics: Metrics) -> Snapshot:
    """The last good snapshot (see `StateStore.load`), counted by where it came from."""
    result = store.load()
    metrics.state_restore.labels(result.source).inc()
    if result.problem:
        logger.error("state: %s (loaded from: %s)", result.problem, result.source)
    return result.snapshot


def take_back(
    manager: InstanceManager,
    config: ManagerConfig,
    snapshot: Snapshot,
    *,
    embedded: bool,
    state_file: str | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Register saved instances, then config seeds not in the state file, then the default.

    Logs one line naming ``state_file`` and what was restored in which
    desired state; counts the seeds and the default as created in ``metrics``.
    """
    restored: dict[str, int] = {}
    for saved in snapshot.instances:
        desired = Desired(saved.desired)
        if not config.auto_restore_on_restart:
            desired = Desired.STOPPED
        if _register(manager, spec_of(saved), saved, desired):
            restored[desired.value] = restored.get(desired.value, 0) + 1
    if state_file is not None:
        total = sum(restored.values())
        states = ", ".join(f"{n} {state}" for state, n in sorted(restored.items()))
        logger.info(
            "state file %s: %s",
            state_file,
            f"restored {total} instance{'s' if total != 1 else ''} ({states})"
            if total
            else "no saved instances",
        )
    new: list[InstanceSpec] = []
    for seed in config.instances:
        if seed.name not in manager.names() and _register(manager, seed, None, Desired.RUNNING):
            new.append(seed)
    if not manager.names() and embedded and config.default_instance:
        logger.info(
            "no instances configured or saved: starting %r (%s) on the embedded backend",
            DEFAULT_INSTANCE.name,
            DEFAULT_INSTANCE.model_id,
        )
        if _register(manager, DEFAULT_INSTANCE, None, Desired.RUNNING):
            new.append(DEFAULT_INSTANCE)
    if metrics is not None:
        for spec in new:
            metrics.created.labels(spec.name, spec.model_id).inc()


def _register(
    manager: InstanceManager, spec: InstanceSpec, saved: SavedInstance | None, desired: Desired
) -> bool:
    try:
        manager.register(
            spec,
            port=(saved.port if saved else spec.port) or None,
            prometheus_port=(saved.prometheus_port if saved else spec.prometheus_port) or None,
            created_at=saved.created_at if saved else None,
            desired=desired,
            restarts=saved.restarts if saved else 0,
        )
    except (ValueError, LookupError) as exc:
        logger.error("cannot take back instance %r: %s", spec.name, exc)
        return False
    return True


def collect(manager: InstanceManager) -> list[SavedInstance]:
    """What a snapshot holds of the manager's instances now."""
    out = []
    for record in manager.records():
        fields = msgspec.structs.asdict(record.spec)
        fields.update(port=record.ports.port, prometheus_port=record.ports.prometheus_port)
        out.append(
            SavedInstance(
                **fields,
                desired=record.desired.value,
                created_at=record.created_at,
                restarts=record.restarts,
                port_pinned=record.spec.port is not None,
                prometheus_port_pinned=record.spec.prometheus_port is not None,
            )
        )
    return out


def spec_of(saved: SavedInstance) -> InstanceSpec:
    """The spec as the user gave it: a port the manager chose is no part of it."""
    fields = msgspec.structs.asdict(saved)
    spec = {k: fields[k] for k in _SPEC_FIELDS}
    if not saved.port_pinned:
        spec["port"] = None
    if not saved.prometheus_port_pinned:
        spec["prometheus_port"] = None
    return InstanceSpec(**spec)
