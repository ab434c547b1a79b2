"""The command line and environment of an instance's process."""

from __future__ import annotations

import pytest

from teisup.instances.launch import build_argv, build_env, is_manager_setting
from teisup.instances.spec import InstanceSpec


def test_argv_is_tei_managers_plus_hostname_in_a_fixed_order() -> None:
    spec = InstanceSpec(
        name="bge",
        model_id="BAAI/bge-small-en-v1.5",
        pooling="cls",
        revision="main",
        dtype="float32",
        max_client_batch_size=64,
        auto_truncate=True,
        extra_args=["--tokenization-workers", "2"],
    )
    argv = build_argv(["text-embeddings-router"], spec, 8080, 9100)
    assert argv == [
        "text-embeddings-router",
        "--model-id",
        "BAAI/bge-small-en-v1.5",
        "--port",
        "8080",
        "--hostname",
        "127.0.0.1",
        "--max-batch-tokens",
        "16384",
        "--max-concurrent-requests",
        "512",
        "--prometheus-port",
        "9100",
        "--json-output",
        "--pooling",
        "cls",
        "--revision",
        "main",
        "--dtype",
        "float32",
        "--max-client-batch-size",
        "64",
        "--auto-truncate",
        "--tokenization-workers",
        "2",
    ]


def test_a_launcher_with_arguments_comes_first() -> None:
    spec = InstanceSpec(name="bge", model_id="m")
    argv = build_argv(["/usr/bin/python3", "-m", "teisup.embedded"], spec, 1, 2)
    assert argv[:4] == ["/usr/bin/python3", "-m", "teisup.embedded", "--model-id"]


def test_environment_is_scrubbed_marked_and_pinned() -> None:
    base = {
        "PATH": "/usr/bin",
        "HF_TOKEN": "secret",
        "HOSTNAME": "76f54a599a7b",
        "PORT": "80",
        "MODEL_ID": "other",
        "API_KEY": "k",
        "JSON_OUTPUT": "1",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    env = build_env(base, InstanceSpec(name="bge", model_id="m", gpu_id=1), "mgr-1")
    assert env == {
        "PATH": "/usr/bin",
        "HF_TOKEN": "secret",
        "CUDA_VISIBLE_DEVICES": "1",
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
        "TEISUP_OWNED_BY": "mgr-1",
        "TEISUP_INSTANCE": "bge",
    }


def test_an_unpinned_instance_inherits_the_visible_gpus() -> None:
    env = build_env({"CUDA_VISIBLE_DEVICES": "0,1"}, InstanceSpec(name="a", model_id="m"), "x")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize(
    ("name", "manager_setting"),
    [
        ("TEISUP_API_TOKEN", True),
        ("TEISUP_API_TOKEN_FILE", True),
        ("TEISUP_TLS_KEY", True),
        ("TEISUP_TLS_CERT", True),
        ("TEISUP_TLS_CA", True),
        ("TEISUP_BIND_HOST", True),
        ("TEISUP_MANAGER_ID", True),
        ("TEISUP_SOMETHING_NEW", True),
        ("TEI_MANAGER_API_PORT", True),
        ("TEI_MANAGER_STATE_FILE", True),
        ("TEI_BINARY_PATH", True),
        ("TEISUP_OWNED_BY", True),  # a marker: set afresh, never inherited
        ("TEISUP_INSTANCE", True),
        ("HF_TOKEN", False),
        ("HUGGING_FACE_HUB_TOKEN", False),
        ("TEISUPER", False),
        ("MY_TEISUP_API_TOKEN", False),
        ("teisup_api_token", False),
        ("PATH", False),
        ("CUDA_VISIBLE_DEVICES", False),
    ],
)
def test_the_managers_own_settings_are_told_apart(name: str, manager_setting: bool) -> None:
    assert is_manager_setting(name) is manager_setting


def test_the_managers_secrets_never_reach_a_child_but_its_markers_do() -> None:
    base = {
        "PATH": "/usr/bin",
        "HF_TOKEN": "hf-secret",
        "TEISUP_API_TOKEN": "api-secret-0123456789",
        "TEISUP_API_TOKEN_FILE": "/run/secrets/token",
        "TEISUP_TLS_KEY": "/etc/teisup/key.pem",
        "TEI_MANAGER_API_PORT": "9000",
        "TEI_BINARY_PATH": "/usr/local/bin/text-embeddings-router",
        "TEISUP_OWNED_BY": "someone-else",
        "TEISUP_INSTANCE": "other",
    }
    env = build_env(base, InstanceSpec(name="bge", model_id="m"), "mgr-1")
    assert env == {
        "PATH": "/usr/bin",
        "HF_TOKEN": "hf-secret",
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
        "TEISUP_OWNED_BY": "mgr-1",
        "TEISUP_INSTANCE": "bge",
    }
