"""Configuration: file, environment and flags; errors that say where."""

from __future__ import annotations

import re
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
