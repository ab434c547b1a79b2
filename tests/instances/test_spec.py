"""Instance specs: defaults, validation messages, the flags an instance may not touch."""

from __future__ import annotations

import json
from collections.abc import Callable

import msgspec
import pytest

from teisup.instances.spec import InstanceSpec, RestartBackoff, RestartPolicy, spec_from_dict
from teisup.supervision import Backoff, RestartType


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


#: Every numeric field of a spec: (path, a value just below its range, one
#: just above, the two ends of the range). Backoff fields are set next to
#: ``initial=0, maximum=86400`` so that ``initial <= maximum`` holds at the ends.
BOUNDS: list[tuple[str, float, float, tuple[float, float]]] = [
    ("port", -1, 65536, (0, 65535)),
    ("prometheus_port", -1, 65536, (0, 65535)),
    ("gpu_id", -1, 1024, (0, 1023)),
    ("max_batch_tokens", 0, 2**24 + 1, (1, 2**24)),
    ("max_concurrent_requests", 0, 2**16 + 1, (1, 2**16)),
    ("max_client_batch_size", 0, 2**16 + 1, (1, 2**16)),
    ("startup_timeout_secs", 0, 86400.5, (0.001, 86400)),
    ("stop_grace_secs", -0.5, 86400.5, (0, 86400)),
    ("restart.max_restarts", -1, 10001, (0, 10000)),
    ("restart.window_secs", 0, 604800.5, (0.001, 604800)),
    ("restart.backoff.initial", -0.5, 86400.5, (0, 86400)),
    ("restart.backoff.factor", 0.5, 10.5, (1, 10)),
    ("restart.backoff.maximum", -0.5, 86400.5, (0, 86400)),
    ("restart.backoff.reset_after", -0.5, 604800.5, (0, 604800)),
]
#: The absurd values of issue 11, each far outside its field's range.
ABSURD: list[tuple[str, float]] = [
    ("max_batch_tokens", 2**70),
    ("max_concurrent_requests", 2**40),
    ("restart.max_restarts", 2**70),
    ("restart.window_secs", 1e308),
    ("restart.backoff.factor", 1e300),
    ("startup_timeout_secs", 1e308),
]
FLOAT_FIELDS = [path for path, low, high, _ in BOUNDS if "secs" in path or "backoff" in path]


def _spec_with(path: str, value: object) -> dict[str, object]:
    data: dict[str, object] = {"name": "ok", "model_id": "BAAI/bge-small-en-v1.5"}
    if path.startswith("restart.backoff."):
        data["restart"] = {"backoff": {"initial": 0, "maximum": 86400}}
    node = data
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})  # type: ignore[assignment]
    node[leaf] = value
    return data


def _json_bytes(data: object) -> bytes:
    # The standard library writes any integer, as a client would send it.
    return json.dumps(data).encode()


def _cases() -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = []
    for path, low, high, _ in BOUNDS:
        cases += [(path, low), (path, high)]
    return cases + ABSURD


@pytest.mark.parametrize(("path", "value"), _cases())
def test_a_number_outside_its_range_is_refused_naming_the_field(path: str, value: object) -> None:
    body = _json_bytes(_spec_with(path, value))
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(body, type=InstanceSpec)
    assert f"$.{path}" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "value"), [(path, end) for path, _, _, ends in BOUNDS for end in ends]
)
def test_the_ends_of_each_range_are_accepted(path: str, value: float) -> None:
    spec = msgspec.json.decode(_json_bytes(_spec_with(path, value)), type=InstanceSpec)
    node: object = spec
    for key in path.split("."):
        node = getattr(node, key)
    assert node == value


@pytest.mark.parametrize("path", FLOAT_FIELDS)
@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
def test_nan_and_infinities_from_toml_are_refused(path: str, literal: str) -> None:
    *parents, leaf = path.split(".")
    table = {"initial": 0, "maximum": 86400} if parents == ["restart", "backoff"] else {}
    table.pop(leaf, None)
    lines = [f"{key} = {value}" for key, value in table.items()] + [f"{leaf} = {literal}"]
    header = f"[{'.'.join(parents)}]\n" if parents else ""
    text = 'name = "ok"\nmodel_id = "m"\n' + header + "\n".join(lines) + "\n"
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.toml.decode(text, type=InstanceSpec)
    assert f"$.{path}" in str(caught.value)


def test_the_backoff_of_issue_11_is_refused_naming_factor() -> None:
    body = (
        b'{"name": "ok", "model_id": "m", "restart": {"backoff":'
        b' {"initial": 5e-324, "factor": 1e300, "maximum": 60}}}'
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.restart\.backoff\.factor"):
        msgspec.json.decode(body, type=InstanceSpec)


def test_initial_above_maximum_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"maximum .* must not be below initial"):
        spec_from_dict(_spec_with("restart.backoff", {"initial": 120, "maximum": 60}))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: InstanceSpec(name="ok", model_id="m", max_batch_tokens=2**70), "max_batch_tokens"),
        (lambda: InstanceSpec(name="ok", model_id="m", gpu_id=4096), "gpu_id"),
        (lambda: InstanceSpec(name="ok", model_id="m", port=65536), "port"),
        (lambda: RestartPolicy(max_restarts=2**70), "max_restarts"),
        (lambda: RestartPolicy(window_secs=1e308), "window_secs"),
        (lambda: RestartBackoff(factor=1e300), "factor"),
        (lambda: RestartBackoff(initial=float("nan")), "initial"),
        # A plain supervision Backoff is held to the instance bounds too.
        (lambda: RestartPolicy(backoff=Backoff(initial=1e-9, factor=1e300)), "factor"),
    ],
)
def test_code_built_values_are_held_to_the_same_bounds(
    build: Callable[[], object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        build()


@pytest.mark.parametrize("name", ["Bad Name", "-lead", "x" * 64, "a/b", ""])
def test_a_bad_name_is_refused_in_words_not_a_regex(name: str) -> None:
    with pytest.raises(msgspec.ValidationError) as decoded:
        spec_from_dict({"name": name, "model_id": "m"})
    with pytest.raises(ValueError, match="an instance name must be") as built:
        InstanceSpec(name=name, model_id="m")
    for message in (str(decoded.value), str(built.value)):
        assert "1 to 63 characters: lower-case letters, digits" in message
        assert "regex" not in message
        assert "[a-z0-9]" not in message
