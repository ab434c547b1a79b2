"""docs/CONFIGURATION.md names every key, variable and flag; the example file loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec

from teisup.cli import build_parser
from teisup.instances import InstanceSpec, RestartPolicy
from teisup.security import TlsSettings
from teisup.service import ENVIRONMENT, TLS_ENVIRONMENT, ManagerConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "CONFIGURATION.md").read_text()
EXAMPLE = ROOT / "deploy" / "teisup.example.toml"


def names(struct: type[msgspec.Struct]) -> list[str]:
    return [field.name for field in msgspec.structs.fields(struct)]


def test_the_example_configuration_loads_with_the_real_loader() -> None:
    config = load_config(EXAMPLE, environ={})
    assert [seed.name for seed in config.instances] == ["bge-small", "splade"]
    splade = config.instances[1]
    assert (splade.pooling, splade.gpu_id) == ("splade", 0)
    assert splade.restart is not None
    assert splade.restart.max_restarts == 3
    assert config.max_instances == 8
    assert config.state_file == "/data/tei-manager-state.toml"
    assert str(EXAMPLE.relative_to(ROOT)) in DOC


def test_every_config_key_is_documented() -> None:
    missing = [f"`{key}`" for key in names(ManagerConfig) if f"`{key}`" not in DOC]
    missing += [f"`{key}`" for key in names(InstanceSpec) if f"`{key}`" not in DOC]
    missing += [f"`{key}`" for key in names(RestartPolicy) if f"`{key}`" not in DOC]
    missing += [
        f"`backoff.{key}`"
        for key in names(type(RestartPolicy().backoff))
        if f"`backoff.{key}`" not in DOC
    ]
    missing += [f"`tls.{key}`" for key in names(TlsSettings) if f"`tls.{key}`" not in DOC]
    assert missing == [], "keys docs/CONFIGURATION.md does not list"


def test_every_environment_variable_is_documented_and_in_help() -> None:
    variables = [*ENVIRONMENT, *TLS_ENVIRONMENT]
    assert [v for v in variables if f"`{v}`" not in DOC] == []
    help_text = subprocess.run(
        [sys.executable, "-m", "teisup", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert [v for v in variables if v not in help_text] == []
    assert "docs/CONFIGURATION.md" in help_text


def test_every_flag_is_documented() -> None:
    flags = [option for action in build_parser()._actions for option in action.option_strings]
    assert "--log-format" in flags
    assert [flag for flag in flags if f"`{flag}`" not in DOC] == []
