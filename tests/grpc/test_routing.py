"""Routing a Target to an instance: pure, no I/O."""

from __future__ import annotations

import pytest

from teisup.grpc.routing import Replica, RoutingError, resolve, validate_target
from teisup.proto.tei_multiplexer.v1.multiplexer_pb2 import Target
from teisup.rpc import StatusCode
from teisup.supervision import ChildState

FLEET = [
    Replica("c-splade", "naver/splade", ChildState.RUNNING),
    Replica("a-bge", "BAAI/bge", ChildState.RUNNING),
    Replica("b-bge", "BAAI/bge", ChildState.RUNNING),
    Replica("d-bge", "BAAI/bge", ChildState.STARTING),
    Replica("e-broken", "org/broken", ChildState.FAILED),
    Replica("f-broken", "org/broken", ChildState.UNHEALTHY),
]


def refused(target: Target | None, instances: list[Replica] = FLEET) -> tuple[StatusCode, str]:
    with pytest.raises(RoutingError) as caught:
        resolve(target, instances)
    return caught.value.code, caught.value.message


def test_malformed_targets_are_invalid_argument() -> None:
    assert refused(None) == (StatusCode.INVALID_ARGUMENT, "Missing target")
    assert refused(Target()) == (StatusCode.INVALID_ARGUMENT, "No routing specified")
    assert refused(Target(model_id="")) == (StatusCode.INVALID_ARGUMENT, "Model ID cannot be empty")


def test_empty_instance_name_is_refused_as_tei_manager_does() -> None:
    target = Target(instance_name="")
    assert target.WhichOneof("routing") == "instance_name"  # set, though empty
    assert refused(target) == (StatusCode.INVALID_ARGUMENT, "Instance name cannot be empty")
    with pytest.raises(RoutingError):
        validate_target(target)
    assert validate_target(Target(instance_index=99)).instance_index == 99


def test_by_name() -> None:
    assert resolve(Target(instance_name="a-bge"), FLEET) == "a-bge"
    assert refused(Target(instance_name="zzz")) == (
        StatusCode.NOT_FOUND,
        "Instance 'zzz' not found",
    )
    assert refused(Target(instance_name="d-bge")) == (
        StatusCode.UNAVAILABLE,
        "Instance 'd-bge' is not running (status: starting)",
    )


def test_by_index_counts_over_names_sorted() -> None:
    assert resolve(Target(instance_index=0), FLEET) == "a-bge"
    assert resolve(Target(instance_index=2), FLEET) == "c-splade"
    assert refused(Target(instance_index=3)) == (
        StatusCode.UNAVAILABLE,
        "Instance 'd-bge' is not running (status: starting)",
    )
    assert refused(Target(instance_index=6)) == (
        StatusCode.NOT_FOUND,
        "Instance index 6 out of range (6 instances)",
    )
    assert refused(Target(instance_index=0), []) == (
        StatusCode.NOT_FOUND,
        "Instance index 0 out of range (0 instances)",
    )


def test_by_model_least_outstanding_among_running_replicas() -> None:
    target = Target(model_id="BAAI/bge")
    # Never the starting replica, even when it is idle.
    assert resolve(target, FLEET, outstanding={"a-bge": 3, "b-bge": 1}) == "b-bge"
    assert resolve(target, FLEET, outstanding={"a-bge": 0, "b-bge": 1, "d-bge": 0}) == "a-bge"
    # Ties go to the replica picked least recently (never picked counts as oldest).
    assert resolve(target, FLEET, last_picked={"a-bge": 5}) == "b-bge"
    assert resolve(target, FLEET, last_picked={"a-bge": 5, "b-bge": 6}) == "a-bge"


def test_by_model_alternates_for_a_sequential_client() -> None:
    target = Target(model_id="BAAI/bge")
    picked: dict[str, int] = {}
    order = []
    for n in range(4):
        name = resolve(target, FLEET, last_picked=picked)
        picked[name] = n
        order.append(name)
    assert order == ["a-bge", "b-bge", "a-bge", "b-bge"]


def test_by_model_errors() -> None:
    assert refused(Target(model_id="org/none")) == (
        StatusCode.NOT_FOUND,
        "No instance serves model 'org/none'",
    )
    assert refused(Target(model_id="org/broken")) == (
        StatusCode.UNAVAILABLE,
        "No running instance serves model 'org/broken' (e-broken: failed, f-broken: unhealthy)",
    )
