"""Property tests: whatever the input, the decoders answer with a validation
error or a valid value, never anything else."""

from __future__ import annotations

import contextlib
import string
import tempfile
from pathlib import Path

import msgspec
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teisup.instances import InstanceSpec, spec_from_dict
from teisup.service.config import ConfigError, load_config

KEYS = st.sampled_from(
    [*InstanceSpec.__struct_fields__, "restart", "type", "backoff", "initial", "x", ""]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["bge", "m", "--port", "-p8", "mean", "splade", "float16", "a\\n"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_spec_decoding_fails_only_with_a_validation_error(data: dict[str, object]) -> None:
    try:
        spec = spec_from_dict(data)
    except msgspec.ValidationError:
        return
    assert isinstance(spec, InstanceSpec)
    # What decodes, re-encodes and decodes to the same spec.
    assert msgspec.json.decode(msgspec.json.encode(spec), type=InstanceSpec) == spec


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(alphabet=string.printable, max_size=200).map(str.encode))
def test_request_bodies_fail_only_with_decode_or_validation_errors(body: bytes) -> None:
    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
        msgspec.convert(msgspec.json.decode(body), InstanceSpec)


CONFIG_KEYS = st.sampled_from(
    ["api_port", "grpc_port", "state_file", "max_instances", "health_check_interval_secs",
     "instance_port_start", "instance_port_end", "default_restart", "instances", "bogus"]
)  # fmt: skip
TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(CONFIG_KEYS, TOML_VALUES, max_size=6) | st.text(max_size=120))
def test_config_loading_fails_only_with_a_config_error(content: dict[str, object] | str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "teisup.toml"
        if isinstance(content, dict):
            try:
                path.write_text(tomli_w.dumps(content))
            except (TypeError, ValueError):
                return  # not representable as TOML at all
        else:
            path.write_text(content)
        with contextlib.suppress(ConfigError):
            load_config(path, environ={})
