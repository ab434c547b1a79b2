"""Configuration: file, environment and flags; errors that say where."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from teisup.service.config import ConfigError, ManagerConfig, load_config

TEI_MANAGER_EXAMPLE = """\
api_port = 9000
grpc_port = 9001
state_file = "/data/state.toml"
health_check_interval_secs = 30
max_instances = 10

# Seed instances
[[instances]]
name = "bge-small"
model_id = "BAAI/bge-small-en-v1.5"
gpu_id = 0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "teisup.toml"
    path.write_text(text)
    return path


def test_the_product_brief_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, TEI_MANAGER_EXAMPLE), environ={})
    assert (config.api_port, config.grpc_port, config.max_instances) == (9000, 9001, 10)
    assert config.health_check_interval_secs == 30
    [seed] = config.instances
    assert (seed.name, seed.port, seed.gpu_id) == ("bge-small", None, 0)  # port assigned later


def test_precedence_is_flags_then_environment_then_file(tmp_path: Path) -> None:
    path = write(tmp_path, "api_port = 9100\ngrpc_port = 9101\n")
    env = {"TEI_MANAGER_API_PORT": "9200", "TEI_MANAGER_GRPC_PORT": "9201"}
    config = load_config(path, environ=env, overrides={"api_port": 9300})
    assert (config.api_port, config.grpc_port) == (9300, 9201)
    assert load_config(None, environ={}).api_port == 9000


def test_environment_names_are_tei_managers(tmp_path: Path) -> None:
    env = {
        "TEI_MANAGER_STATE_FILE": str(tmp_path / "s.toml"),
        "TEI_BINARY_PATH": "/usr/local/bin/text-embeddings-router",
        "TEI_MANAGER_HEALTH_CHECK_INTERVAL": "7",
        "TEI_MANAGER_LOG_DIR": "/var/log/tei",
        "TEI_MANAGER_GRPC_ENABLED": "false",
        "TEISUP_MAX_INSTANCES": "4",
    }
    config = load_config(None, environ=env)
    assert config.state_file == str(tmp_path / "s.toml")
    assert config.tei_binary_path == "/usr/local/bin/text-embeddings-router"
    assert config.health_check_interval_secs == 7.0
    assert config.effective_log_dir == "/var/log/tei"
    assert config.grpc_enabled is False
    assert config.max_instances == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api_port = 9000\napi_prot = 9001\n", "line 2: Object contains unknown field `api_prot`"),
        ('max_instances = 2\nhealth_check_interval_secs = "often"\n', "line 2"),
        ("api_port = 0\n", "line 1"),
        (
            '[[instances]]\nname = "a"\nmodel_id = "m"\n\n[[instances]]\nname = "b"\n'
            'model_id = "m"\nport = "x"\n',
            "line 8",
        ),
        ("api_port = 9000\ngrpc_port = 9000\n", "api_port and grpc_port are both 9000"),
        ('[[instances]]\nname = "a"\nmodel_id = "m"\nport = 9000\n', "manager's own ports"),
        (
            '[[instances]]\nname = "a"\nmodel_id = "m"\n'
            '[[instances]]\nname = "a"\nmodel_id = "n"\n',
            "duplicate instance name",
        ),
        ("instance_port_start = 9000\ninstance_port_end = 8000\n", "instance_port_end"),
        ("api_port = = 1\n", "line 1"),
    ],
)
def test_errors_name_the_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"teisup\.toml") as caught:
        load_config(path, environ={})
    assert message in str(caught.value)


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="TEI_MANAGER_API_PORT"):
        load_config(None, environ={"TEI_MANAGER_API_PORT": "ninety"})


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", environ={})


def test_the_manager_id_follows_the_state_file(tmp_path: Path) -> None:
    a = ManagerConfig(state_file=str(tmp_path / "a.toml"))
    assert (
        a.effective_manager_id
        == ManagerConfig(state_file=str(tmp_path / "a.toml")).effective_manager_id
    )
    assert (
        a.effective_manager_id
        != ManagerConfig(state_file=str(tmp_path / "b.toml")).effective_manager_id
    )
    assert ManagerConfig(manager_id="fixed").effective_manager_id == "fixed"


def test_the_api_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    token = "0123456789abcdef-token"
    assert load_config(None, environ={"TEISUP_API_TOKEN": token}).resolve_api_token() == token
    (tmp_path / "token").write_text(token + "\n")
    config = load_config(None, environ={"TEISUP_API_TOKEN_FILE": str(tmp_path / "token")})
    assert config.resolve_api_token() == token
    assert load_config(None, environ={}).resolve_api_token() is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"api_token_file": "/nonexistent/token"}, "/nonexistent/token"),
        ({"api_token": "short"}, "at least 16"),
        ({"api_token": "a" * 20, "api_token_file": "/x"}, "not both"),
    ],
)
def test_an_unusable_token_is_refused_at_start(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ManagerConfig(**settings).resolve_api_token()  # type: ignore[arg-type]


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        ManagerConfig(api_token_file=str(tmp_path / "token")).resolve_api_token()


TEI_MANAGER_MTLS = """\
grpc_max_message_size_mb = 64
grpc_max_parallel_streams = 1024
grpc_request_timeout_secs = 10

[auth]
enabled = true
providers = ["mtls"]

[auth.mtls]
ca_cert = "/certs/ca.pem"
server_cert = "/certs/server.pem"
server_key = "/certs/server-key.pem"
verify_subject = true
allowed_subjects = ["C=US, O=Example, CN=tei-client", "batch-job"]
verify_san = true
allowed_sans = ["DNS:client.example.com"]
"""


def test_tei_managers_grpc_keys_and_auth_section_load_as_tls(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, TEI_MANAGER_MTLS), environ={})
    assert config.grpc_max_message_size_mb == 64
    assert config.grpc_request_timeout_secs == 10
    tls = config.tls
    assert (tls.cert, tls.key, tls.ca) == (
        "/certs/server.pem",
        "/certs/server-key.pem",
        "/certs/ca.pem",
    )
    assert tls.client_auth == "required"
    assert tls.allowed_subjects == ["tei-client", "batch-job"]
    assert tls.allowed_sans == ["client.example.com"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("require_cert_headers = false", "require_cert_headers = true"), "X-SSL-Client-Cert"),
        (("verify_san = true", "allow_self_signed = true"), "allow_self_signed"),
        (('providers = ["mtls"]', "providers = []"), 'providers = ["mtls"]'),
        (('server_key = "/certs/server-key.pem"', ""), "needs server_key"),
        (("verify_san = true", "verify_sans = true"), "unknown key 'verify_sans'"),
    ],
)
def test_auth_settings_teisup_will_not_honour_are_refused(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = TEI_MANAGER_MTLS.replace("providers", "require_cert_headers = false\nproviders", 1)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text.replace(*change)), environ={})


def test_a_disabled_auth_section_is_ignored_as_tei_manager_does(tmp_path: Path) -> None:
    text = TEI_MANAGER_MTLS.replace("enabled = true", "enabled = false")
    assert not load_config(write(tmp_path, text), environ={}).tls.enabled


#: Every numeric key of the config: (key, just below its range, just above,
#: the two ends). A port-range end above its start is set next to the key.
CONFIG_BOUNDS: list[tuple[str, float, float, tuple[float, float]]] = [
    ("api_port", 0, 65536, (1, 65535)),
    ("grpc_port", 0, 65536, (1, 65535)),
    ("grpc_max_message_size_mb", 0, 1024, (1, 1023)),
    ("grpc_max_parallel_streams", 0, 2**20 + 1, (1, 2**20)),
    ("grpc_request_timeout_secs", -0.5, 86400.5, (0, 86400)),
    ("grpc_stream_idle_timeout_secs", -0.5, 86400.5, (0, 86400)),
    ("grpc_queue_timeout_secs", -0.5, 3600.5, (0, 3600)),
    ("health_check_interval_secs", 0, 3600.5, (0.001, 3600)),
    ("health_check_timeout_secs", 0, 3600.5, (0.001, 3600)),
    ("max_failures_before_restart", -1, 1001, (0, 1000)),
    ("startup_timeout_secs", 0, 86400.5, (0.001, 86400)),
    ("graceful_shutdown_timeout_secs", -0.5, 86400.5, (0, 86400)),
    ("max_instances", 0, 65536, (1, 100)),
    ("instance_port_start", 0, 65536, (1, 65534)),
    ("instance_port_end", 0, 65536, (65535, 65535)),
    ("prometheus_port_start", 0, 65536, (1, 65534)),
    ("prometheus_port_end", 0, 65536, (65535, 65535)),
]


def _config_text(key: str, value: object) -> str:
    # Keep the other settings consistent with the one under test.
    context = {"api_port": 40000, "grpc_port": 40001}
    if key in ("instance_port_start", "instance_port_end"):
        context |= {"instance_port_start": 1, "instance_port_end": 65535}
    if key in ("prometheus_port_start", "prometheus_port_end"):
        context |= {"prometheus_port_start": 1, "prometheus_port_end": 65535}
    context.pop(key, None)
    lines = [f"{k} = {v}" for k, v in context.items()]
    return "\n".join([*lines, f"{key} = {value}", ""])


@pytest.mark.parametrize(
    ("key", "value"),
    [(key, bad) for key, low, high, _ in CONFIG_BOUNDS for bad in (low, high)]
    + [("max_instances", 2**70), ("grpc_max_parallel_streams", 2**40)]
    + [
        (key, bad)
        for key in ("health_check_interval_secs", "grpc_request_timeout_secs")
        for bad in ("nan", "inf", "-inf", 1e308)
    ],
)
def test_a_number_outside_its_range_names_the_key_and_line(
    tmp_path: Path, key: str, value: object
) -> None:
    text = _config_text(key, value)
    line = text.splitlines().index(f"{key} = {value}") + 1
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert f"teisup.toml, line {line}:" in str(caught.value)
    assert f"$.{key}" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value"), [(key, end) for key, _, _, ends in CONFIG_BOUNDS for end in ends]
)
def test_the_ends_of_each_config_range_are_accepted(tmp_path: Path, key: str, value: float) -> None:
    config = load_config(write(tmp_path, _config_text(key, value)), environ={})
    assert getattr(config, key) == value


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("default_restart", "max_restarts", 2**70),
        ("default_restart", "window_secs", "inf"),
        ("default_restart.backoff", "factor", 1e300),
        ("default_restart.backoff", "initial", "nan"),
        ("default_restart.backoff", "reset_after", 1e308),
    ],
)
def test_the_default_restart_policy_is_bounded_too(
    tmp_path: Path, section: str, key: str, value: object
) -> None:
    text = f"api_port = 9000\n[{section}]\n{key} = {value}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert "line 3:" in str(caught.value)
    assert f"$.{section}.{key}" in str(caught.value)


def test_a_seed_instance_is_bounded_too(tmp_path: Path) -> None:
    text = '[[instances]]\nname = "a"\nmodel_id = "m"\nmax_concurrent_requests = 1099511627776\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert "line 4:" in str(caught.value)
    assert "$.instances[0].max_concurrent_requests" in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TEI_MANAGER_HEALTH_CHECK_INTERVAL", "nan"),
        ("TEI_MANAGER_HEALTH_CHECK_INTERVAL", "inf"),
        ("TEI_MANAGER_HEALTH_CHECK_INTERVAL", "1e308"),
        ("TEI_MANAGER_HEALTH_CHECK_INTERVAL", "0"),
        ("TEI_MANAGER_API_PORT", "65536"),
        ("TEI_MANAGER_GRPC_PORT", "0"),
        ("TEISUP_MAX_INSTANCES", "1180591620717411303424"),
        ("TEISUP_MAX_INSTANCES", "0"),
    ],
)
def test_an_environment_number_outside_its_range_names_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"^environment variable {variable}:"):
        load_config(None, environ={variable: value})


@pytest.mark.parametrize("kwargs", [{"health_check_timeout_secs": float("nan")},
                                    {"max_instances": 2**70}, {"grpc_port": 70000}])  # fmt: skip
def test_a_config_built_in_code_is_held_to_the_same_bounds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ManagerConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["--api-port", "--grpc-port"])
def test_a_flag_outside_its_range_names_the_flag(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "teisup", flag, "70000"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"flag {flag}: Expected `int` <= 65535" in done.stderr
