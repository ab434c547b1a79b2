"""Instance specs: defaults, validation messages, the flags an instance may not touch."""

from __future__ import annotations

import msgspec
import pytest

from teisup.instances.spec import InstanceSpec, RestartPolicy, spec_from_dict
from teisup.supervision import RestartType


def test_defaults_match_tei_manager() -> None:
    spec = spec_from_dict({"name": "bge-small", "model_id": "BAAI/bge-small-en-v1.5"})
    assert (spec.port, spec.gpu_id, spec.pooling) == (None, None, None)
    assert (spec.max_batch_tokens, spec.max_concurrent_requests) == (16384, 512)
    assert spec.restart is None  # the manager's default applies
    policy = RestartPolicy()
    assert policy.type is RestartType.PERMANENT
    assert (policy.intensity.max_restarts, policy.intensity.period) == (5, 600.0)


def test_a_full_spec_round_trips_through_json_and_toml() -> None:
    spec = spec_from_dict(
        {
            "name": "splade",
            "model_id": "/models/splade",
            "port": 8085,
            "gpu_id": 1,
            "pooling": "splade",
            "dtype": "float16",
            "auto_truncate": True,
            "extra_args": ["--tokenization-workers", "2"],
            "restart": {"type": "transient", "max_restarts": 2, "backoff": {"initial": 5}},
        }
    )
    assert msgspec.json.decode(msgspec.json.encode(spec), type=InstanceSpec) == spec
    assert msgspec.toml.decode(msgspec.toml.encode(spec), type=InstanceSpec) == spec


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"name": "-lead"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"model_id": ""}, "model_id"),
        ({"model_id": "--trust-remote-code"}, "must not start with '-'"),
        ({"model_id": "a\nb"}, "line breaks"),
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"gpu_id": -1}, "gpu_id"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"pooling": "max"}, "pooling"),
        ({"dtype": "int8"}, "dtype"),
        ({"colour": "blue"}, "unknown field `colour`"),
        ({"extra_args": ["--port", "1"]}, "--port: the manager owns it"),
        ({"extra_args": ["--hostname=0.0.0.0"]}, "--hostname: the manager owns it"),
        ({"extra_args": ["--prometheus-port", "9"]}, "--prometheus-port"),
        ({"extra_args": ["--pooling", "cls"]}, "use the field 'pooling'"),
        ({"extra_args": ["--help"]}, "exit at once"),
        ({"extra_args": ["float16"]}, "must start with a flag"),
        ({"restart": {"type": "sometimes"}}, "restart.type"),
        ({"restart": {"max_restarts": -1}}, "max_restarts"),
        ({"restart": {"backoff": {"factor": 0.1}}}, "factor"),
    ],
)
def test_bad_values_are_refused_naming_the_field(patch: dict[str, object], message: str) -> None:
    data = {"name": "ok", "model_id": "BAAI/bge-small-en-v1.5", **patch}
    with pytest.raises((msgspec.ValidationError, ValueError), match=message):
        spec_from_dict(data)


def test_construction_in_code_is_validated_too() -> None:
    with pytest.raises(ValueError, match="name"):
        InstanceSpec(name="UPPER", model_id="m")
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(max_restarts=-2)


def test_port_zero_means_assign_one() -> None:
    assert spec_from_dict({"name": "a", "model_id": "m", "port": 0}).port == 0


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"name": "bge\n"}, "name"),
        ({"extra_args": ["-p8080"]}, "-p: the manager owns it"),
        ({"extra_args": ["-p=8080"]}, "-p: the manager owns it"),
        ({"stop_grace_secs": float("inf")}, "stop_grace_secs"),
        ({"stop_grace_secs": 1e300}, "stop_grace_secs"),
        ({"startup_timeout_secs": float("nan")}, "startup_timeout_secs"),
    ],
)
def test_the_subtle_bad_values_are_refused_too(patch: dict[str, object], message: str) -> None:
    with pytest.raises((msgspec.ValidationError, ValueError), match=message):
        spec_from_dict({"name": "ok", "model_id": "m", **patch})


@pytest.mark.parametrize(
    "kwargs",
    [{"startup_timeout_secs": -1.0}, {"stop_grace_secs": float("nan")}, {"stop_grace_secs": -5.0}],
)
def test_code_built_specs_refuse_bad_budgets(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="secs"):
        InstanceSpec(name="ok", model_id="m", **kwargs)  # type: ignore[arg-type]
