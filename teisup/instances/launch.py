"""The exact command line and environment an instance's process gets (pure).

TEI's router reads every flag from an environment variable of the same name
too (``--port`` from ``PORT``, ``--hostname`` from ``HOSTNAME``, which Docker
sets to the container id), so the child environment is scrubbed of those
names: what the manager passes on the command line is what the router uses.
The manager's own configuration goes too (`is_manager_setting`): its API
token, TLS key paths and every other ``TEISUP_*`` / ``TEI_MANAGER_*`` setting
are its secrets and its business, never a child's (``/proc/<pid>/environ`` is
readable by anything running as the same user).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .spec import InstanceSpec, check_extra_args

__all__ = [
    "INSTANCE_MARKER",
    "MANAGER_MARKER",
    "SCRUBBED_VARIABLES",
    "build_argv",
    "build_env",
    "is_manager_setting",
]

#: Marker variables on every child, so leftovers of a dead manager can be found.
#: Deliberately not the name of any setting (``TEISUP_MANAGER_ID`` configures
#: the id), so a process that merely configures a manager is never swept.
MANAGER_MARKER = "TEISUP_OWNED_BY"
INSTANCE_MARKER = "TEISUP_INSTANCE"

#: The router flags' environment names (clap ``env``), TEI 1.8.3.
SCRUBBED_VARIABLES = frozenset(
    {
        "MODEL_ID",
        "REVISION",
        "TOKENIZATION_WORKERS",
        "DTYPE",
        "POOLING",
        "MAX_CONCURRENT_REQUESTS",
        "MAX_BATCH_TOKENS",
        "MAX_BATCH_REQUESTS",
        "MAX_CLIENT_BATCH_SIZE",
        "AUTO_TRUNCATE",
        "DEFAULT_PROMPT_NAME",
        "DEFAULT_PROMPT",
        "DENSE_PATH",
        "HOSTNAME",
        "PORT",
        "UDS_PATH",
        "PAYLOAD_LIMIT",
        "API_KEY",
        "JSON_OUTPUT",
        "DISABLE_SPANS",
        "OTLP_ENDPOINT",
        "OTLP_SERVICE_NAME",
        "PROMETHEUS_PORT",
        "CORS_ALLOW_ORIGIN",
    }
)

#: The prefixes of the manager's settings (tei-manager's and teisup's).
MANAGER_PREFIXES = ("TEISUP_", "TEI_MANAGER_")

#: Manager settings outside those prefixes.
MANAGER_SETTINGS = frozenset({"TEI_BINARY_PATH"})


def is_manager_setting(name: str) -> bool:
    """Whether the environment variable ``name`` configures the manager (its
    token, its TLS files, its ports, ...) and so must not reach a child.

    The marker variables are the manager's too; `build_env` sets them afresh.
    """
    return name in MANAGER_SETTINGS or name.startswith(MANAGER_PREFIXES)


#: Instances only ever listen on loopback: the multiplexer is the way in.
INSTANCE_HOST = "127.0.0.1"


def build_argv(
    launcher: Sequence[str], spec: InstanceSpec, port: int, prometheus_port: int
) -> list[str]:
    """The router's argv: ``launcher`` (the binary, or an interpreter and a
    module) followed by the flags, then the spec's ``extra_args``.

    A list, never a shell string: each item, ``extra_args``' included, reaches
    the router as one inert argument. The router always listens on loopback
    only (``--hostname 127.0.0.1``); the multiplexer is the way in.
    """
    # Validated when the spec was built, but the list itself is mutable: the
    # manager's flags must not be overridable by whatever it holds now.
    check_extra_args(spec.extra_args)
    argv = [
        *launcher,
        "--model-id",
        spec.model_id,
        "--port",
        str(port),
        "--hostname",
        INSTANCE_HOST,
        "--max-batch-tokens",
        str(spec.max_batch_tokens),
        "--max-concurrent-requests",
        str(spec.max_concurrent_requests),
        "--prometheus-port",
        str(prometheus_port),
        "--json-output",
    ]
    if spec.pooling is not None:
        argv += ["--pooling", spec.pooling]
    if spec.revision is not None:
        argv += ["--revision", spec.revision]
    if spec.dtype is not None:
        argv += ["--dtype", spec.dtype]
    if spec.max_client_batch_size is not None:
        argv += ["--max-client-batch-size", str(spec.max_client_batch_size)]
    if spec.auto_truncate:
        # A bare flag in TEI 1.8: "--auto-truncate true" is a usage error there.
        argv.append("--auto-truncate")
    return argv + list(spec.extra_args)


def build_env(base: Mapping[str, str], spec: InstanceSpec, manager_id: str) -> dict[str, str]:
    """The child's environment: ``base`` minus the router's flag variables
    and the manager's own settings, plus ``NO_COLOR``, the GPU pin and the
    marker variables."""
    env = {
        k: v for k, v in base.items() if k not in SCRUBBED_VARIABLES and not is_manager_setting(k)
    }
    env["NO_COLOR"] = "1"
    # Python children (the embedded backend) would otherwise block-buffer their
    # logs on a pipe and show nothing until they exit.
    env["PYTHONUNBUFFERED"] = "1"
    if spec.gpu_id is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(spec.gpu_id)
    env[MANAGER_MARKER] = manager_id
    env[INSTANCE_MARKER] = spec.name
    return env
