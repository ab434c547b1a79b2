"""Pure routing: which instance serves a request, or which gRPC status refuses it.

`resolve` takes a ``tei_multiplexer.v1.Target`` (or None), a snapshot of the
instances and their load, and returns the chosen instance's name or raises
`RoutingError` with the status code and message the client gets:

* target absent: INVALID_ARGUMENT ``Missing target``;
* no variant set: INVALID_ARGUMENT ``No routing specified``;
* ``instance_name == ""``: INVALID_ARGUMENT ``Instance name cannot be empty``;
* ``model_id == ""``: INVALID_ARGUMENT ``Model ID cannot be empty``;
* unknown name: NOT_FOUND ``Instance '<name>' not found``;
* index past the end: NOT_FOUND ``Instance index <i> out of range (<n> instances)``;
* no instance of the model: NOT_FOUND ``No instance serves model '<model>'``;
* named or indexed instance not ready: UNAVAILABLE
  ``Instance '<name>' is not running (status: <status>)``;
* model known but no replica ready: UNAVAILABLE
  ``No running instance serves model '<model>' (<name>: <status>, ...)``.

The first three and the unknown name are tei-manager's own words; the rest
are teisup's, since the Rust peer routes by name only and never checks status.

Only ``running`` counts as ready: ``starting``, ``unhealthy``, ``backoff``,
``stopping``, ``stopped`` and ``failed`` instances get no traffic. ``model_id``
routing picks, among the running replicas of the model, the one with the
fewest outstanding requests (in flight plus waiting for a slot); ties go to the
replica picked least recently, so a sequential client still alternates.
``instance_index`` counts from 0 over all instances sorted by name, ready or
not, so an index means the same instance whatever their states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2
from teisup.rpc import StatusCode

from ..supervision import ChildState

__all__ = ["READY_STATUS", "Replica", "RoutingError", "resolve", "validate_target"]

READY_STATUS = ChildState.RUNNING
"""The only instance status that receives traffic."""


class RoutingError(Exception):
    """A request that cannot be routed; ``code`` and ``message`` are the gRPC status."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Replica:
    """What routing needs to know about one instance."""

    name: str
    model_id: str
    status: ChildState


def resolve(
    target: multiplexer_pb2.Target | None,
    instances: Sequence[Replica],
    *,
    outstanding: Mapping[str, int] | None = None,
    last_picked: Mapping[str, int] | None = None,
) -> str:
    """The name of the instance that serves a request for ``target``.

    ``instances`` is every known instance (any order); ``outstanding`` maps a
    name to its requests in flight or queued (missing: 0) and ``last_picked``
    to a sequence number of its last selection (missing: never), both for
    ``model_id`` routing only. Raises `RoutingError` (see the module table).
    """
    target = validate_target(target)
    which = target.WhichOneof("routing")
    if which == "instance_name":
        name = target.instance_name
        found = next((i for i in instances if i.name == name), None)
        if found is None:
            raise RoutingError(StatusCode.NOT_FOUND, f"Instance '{name}' not found")
        return _ready(found)
    if which == "instance_index":
        ordered = sorted(instances, key=lambda i: i.name)
        index = target.instance_index
        if index >= len(ordered):
            raise RoutingError(
                StatusCode.NOT_FOUND,
                f"Instance index {index} out of range ({len(ordered)} instances)",
            )
        return _ready(ordered[index])
    # which == "model_id" (the oneof has no other member)
    model = target.model_id
    replicas = sorted((i for i in instances if i.model_id == model), key=lambda i: i.name)
    if not replicas:
        raise RoutingError(StatusCode.NOT_FOUND, f"No instance serves model '{model}'")
    ready = [i for i in replicas if i.status is READY_STATUS]
    if not ready:
        states = ", ".join(f"{i.name}: {i.status.value}" for i in replicas)
        raise RoutingError(
            StatusCode.UNAVAILABLE, f"No running instance serves model '{model}' ({states})"
        )
    load = outstanding or {}
    recency = last_picked or {}
    # min() keeps the first of equals, and `ready` is in name order, so the
    # choice is deterministic for a given snapshot.
    best = min(ready, key=lambda i: (load.get(i.name, 0), recency.get(i.name, -1)))
    return best.name


def validate_target(target: multiplexer_pb2.Target | None) -> multiplexer_pb2.Target:
    """``target`` if it is well formed; the INVALID_ARGUMENT cases of the table otherwise.

    This is all the checking ``noop`` Arrow requests get: they need no instance.
    """
    if target is None:
        raise RoutingError(StatusCode.INVALID_ARGUMENT, "Missing target")
    which = target.WhichOneof("routing")
    if which is None:
        raise RoutingError(StatusCode.INVALID_ARGUMENT, "No routing specified")
    if which == "instance_name" and not target.instance_name:
        raise RoutingError(StatusCode.INVALID_ARGUMENT, "Instance name cannot be empty")
    if which == "model_id" and not target.model_id:
        raise RoutingError(StatusCode.INVALID_ARGUMENT, "Model ID cannot be empty")
    return target


def _ready(instance: Replica) -> str:
    if instance.status is not READY_STATUS:
        raise RoutingError(
            StatusCode.UNAVAILABLE,
            f"Instance '{instance.name}' is not running (status: {instance.status.value})",
        )
    return instance.name
