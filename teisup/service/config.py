"""The manager's configuration: TOML file, environment, flags, in that order of
increasing precedence, decoded and validated with msgspec.

The keys and environment variables are tei-manager's, so its config files and
deployments keep working; teisup's additions use ``TEISUP_*``. Unlike
tei-manager, an unknown key is an error (a typo must not silently turn a
setting off), and every error names the key and, for the file, its line.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from ..instances import MAX_SECONDS, InstanceSpec, RestartPolicy, check_bounds, worded_error
from ..models import InvalidModelId, check_model_id
from ..security import TlsSettings

__all__ = ["ConfigError", "ManagerConfig", "default_state_file", "load_config"]

#: An hour: the longest health-check interval or probe timeout that still
#: notices a dead instance.
MAX_PROBE_SECONDS = 3600.0
#: Streams, instances and failure counts past these are typos.
MAX_STREAMS = 1 << 20
MAX_FAILURES = 1000

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
#: Positive seconds, at most a day (NaN and infinities fail the bounds).
Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]
#: Seconds where 0 means "none" or "at once", at most a day.
OptionalSeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
ProbeSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_PROBE_SECONDS)]
MaxInstances = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class ConfigError(ValueError):
    """The configuration cannot be used; the message says where and why."""


#: tei-manager's default state file.
TEI_MANAGER_STATE_FILE = "/data/tei-manager-state.toml"


def default_state_file(data_dir: str = "/data") -> str:
    """tei-manager's ``/data/tei-manager-state.toml`` where ``/data`` is a
    writable directory (its image and deployments mount one), else
    ``$XDG_STATE_HOME/teisup/state.toml`` (``~/.local/state/...``).

    Outside a container ``/data`` rarely exists, and a manager that cannot
    save its state should not be the default; where it does exist, a
    tei-manager deployment's state (same format) is picked up where it lies.
    """
    if os.path.isdir(data_dir) and os.access(data_dir, os.W_OK | os.X_OK):
        return os.path.join(data_dir, os.path.basename(TEI_MANAGER_STATE_FILE))
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "teisup", "state.toml")


MAX_GRPC_WORKERS = 8
GrpcWorkers = Annotated[int, msgspec.Meta(ge=1, le=MAX_GRPC_WORKERS)]


def default_grpc_workers() -> int:
    """The host's CPU count (the ones this process may use), at most `MAX_GRPC_WORKERS`."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_GRPC_WORKERS))


class ManagerConfig(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Every setting of the manager, with tei-manager's key names."""

    api_port: Port = 9000
    grpc_port: Port = 9001
    grpc_enabled: bool = True
    #: The largest gRPC message, each way, from clients and from instances
    #: (RESOURCE_EXHAUSTED past it); also the HTTP data plane's body limit.
    grpc_max_message_size_mb: Annotated[int, msgspec.Meta(ge=1, le=1023)] = 40
    #: tei-manager's per-stream response buffer. Accepted so its configs load;
    #: teisup's streams are paced by HTTP/2 flow control instead.
    grpc_max_parallel_streams: Annotated[int, msgspec.Meta(ge=1, le=MAX_STREAMS)] = 1024
    #: Deadline of a data-plane call whose client sent none (0: none).
    grpc_request_timeout_secs: OptionalSeconds = 30.0
    #: A stream with no message either way for this long ends (0: never).
    grpc_stream_idle_timeout_secs: OptionalSeconds = 300.0
    #: How long a call waits for a free slot of a saturated instance
    #: (its max_concurrent_requests) before RESOURCE_EXHAUSTED.
    grpc_queue_timeout_secs: Annotated[float, msgspec.Meta(ge=0, le=MAX_PROBE_SECONDS)] = 1.0
    #: Processes serving the multiplexer on ``grpc_port`` (SO_REUSEPORT), each a
    #: child of the root supervisor; 1 serves it inside the manager.
    grpc_workers: GrpcWorkers = msgspec.field(default_factory=default_grpc_workers)
    #: The address the REST API and the multiplexer listen on.
    bind_host: str = "0.0.0.0"
    state_file: str = msgspec.field(default_factory=default_state_file)
    #: Instance log files; default: ``logs/`` next to the state file.
    log_dir: str | None = None
    tei_binary_path: str | None = None
    health_check_interval_secs: ProbeSeconds = 10.0
    health_check_timeout_secs: ProbeSeconds = 5.0
    #: 0: failed probes never restart an instance (it shows unhealthy).
    max_failures_before_restart: Annotated[int, msgspec.Meta(ge=0, le=MAX_FAILURES)] = 3
    #: Start-up budget of an instance: download, load and warm-up.
    startup_timeout_secs: Seconds = 600.0
    #: Grace between SIGTERM and SIGKILL when an instance stops.
    graceful_shutdown_timeout_secs: OptionalSeconds = 30.0
    #: Bring instances back in their desired states at start-up.
    auto_restore_on_restart: bool = True
    max_instances: MaxInstances | None = None
    instance_port_start: Port = 8080
    #: Exclusive, as in tei-manager.
    instance_port_end: Port = 8180
    prometheus_port_start: Port = 9100
    prometheus_port_end: Port = 9200
    #: Applies to instances created without a ``restart`` of their own.
    default_restart: RestartPolicy = RestartPolicy()
    #: Bearer token required on every route that changes or reveals instances
    #: (``TEISUP_API_TOKEN``); or read from ``api_token_file``.
    api_token: str | None = None
    api_token_file: str | None = None
    #: Also require the token on /health and /metrics (open by default, for
    #: probes and scrapers).
    protect_health_and_metrics: bool = False
    #: TLS (and client certificates) for the REST API and the gRPC multiplexer.
    tls: TlsSettings = TlsSettings()
    #: With the embedded backend (no TEI binary) and nothing configured or
    #: saved, start one instance of the packaged CPU model, so a bare
    #: ``teisup`` has something to serve (``TEISUP_DEFAULT_INSTANCE``).
    default_instance: bool = True
    #: Leftovers of a killed manager are found by this id; default: derived
    #: from the state file's path, so a restart on the same state finds them.
    manager_id: str | None = None
    instances: list[InstanceSpec] = msgspec.field(default_factory=list)
    #: Hub model ids registered in the model registry at start-up (tei-manager's).
    models: list[str] | None = None

    def __post_init__(self) -> None:
        # Decoding checks the fields' bounds itself; this covers construction in code.
        check_bounds(self)
        problems = []
        if self.grpc_enabled and self.api_port == self.grpc_port:
            problems.append(f"api_port and grpc_port are both {self.api_port}")
        if self.instance_port_end <= self.instance_port_start:
            problems.append("instance_port_end must be greater than instance_port_start")
        if self.prometheus_port_end <= self.prometheus_port_start:
            problems.append("prometheus_port_end must be greater than prometheus_port_start")
        if self.max_instances is not None:
            size = self.instance_port_end - self.instance_port_start
            if size < self.max_instances:
                problems.append(
                    f"the instance port range holds {size} ports, fewer than max_instances "
                    f"({self.max_instances})"
                )
        names: set[str] = set()
        for index, seed in enumerate(self.instances):
            where = f"instances[{index}] ({seed.name!r})"
            if seed.name in names:
                problems.append(f"{where}: duplicate instance name")
            names.add(seed.name)
            for field in ("port", "prometheus_port"):
                value = getattr(seed, field)
                if value and value in self.manager_ports():
                    problems.append(f"{where}: {field} {value} is one of the manager's own ports")
        for index, model_id in enumerate(self.models or ()):
            try:
                check_model_id(model_id)
            except InvalidModelId as exc:
                problems.append(f"models[{index}]: {exc}")
        if problems:
            raise ValueError("; ".join(problems))

    def instance_defaults(self) -> dict[str, float]:
        """The instance fields these settings give an instance that sets none of its own
        (only where they differ from the instance's own default)."""
        own = {f.name: f.default for f in msgspec.structs.fields(InstanceSpec)}
        settings = {key: getattr(self, name) for key, name in INSTANCE_DEFAULTS.items()}
        return {key: value for key, value in settings.items() if value != own[key]}

    def manager_ports(self) -> dict[int, str]:
        ports = {self.api_port: "the manager's REST API port"}
        if self.grpc_enabled:
            ports[self.grpc_port] = "the manager's gRPC port"
        return ports

    def resolve_api_token(self) -> str | None:
        """The API token, from the setting or its file; ConfigError if unusable."""
        if self.api_token is not None and self.api_token_file is not None:
            raise ConfigError("set api_token or api_token_file, not both")
        token = self.api_token
        if self.api_token_file is not None:
            try:
                token = Path(self.api_token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"api_token_file {self.api_token_file}: {exc.strerror or exc}"
                ) from None
            if not token:
                raise ConfigError(f"api_token_file {self.api_token_file} is empty")
        if token is not None and (len(token) < 16 or any(c.isspace() for c in token)):
            raise ConfigError("api_token must be at least 16 characters with no whitespace")
        return token

    @property
    def effective_log_dir(self) -> str:
        return self.log_dir or os.path.join(os.path.dirname(self.state_file) or ".", "logs")

    @property
    def effective_manager_id(self) -> str:
        if self.manager_id:
            return self.manager_id
        digest = hashlib.sha256(os.path.abspath(self.state_file).encode()).hexdigest()
        return f"teisup-{digest[:12]}"


#: Instance field -> the manager setting that is its default (tei-manager's
#: global keys, which it documents as applying to every instance).
INSTANCE_DEFAULTS = {
    "startup_timeout_secs": "startup_timeout_secs",
    "stop_grace_secs": "graceful_shutdown_timeout_secs",
}


#: Environment variable -> config key. tei-manager's names first.
ENVIRONMENT = {
    "TEI_MANAGER_API_PORT": "api_port",
    "TEI_MANAGER_GRPC_PORT": "grpc_port",
    "TEI_MANAGER_GRPC_ENABLED": "grpc_enabled",
    "TEI_MANAGER_STATE_FILE": "state_file",
    "TEI_BINARY_PATH": "tei_binary_path",
    "TEI_MANAGER_HEALTH_CHECK_INTERVAL": "health_check_interval_secs",
    "TEI_MANAGER_LOG_DIR": "log_dir",
    "TEISUP_BIND_HOST": "bind_host",
    "TEISUP_GRPC_WORKERS": "grpc_workers",
    "TEISUP_MAX_INSTANCES": "max_instances",
    "TEISUP_MANAGER_ID": "manager_id",
    "TEISUP_API_TOKEN": "api_token",
    "TEISUP_API_TOKEN_FILE": "api_token_file",
    "TEISUP_DEFAULT_INSTANCE": "default_instance",
}


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ManagerConfig:
    """Defaults, then the TOML file at ``path``, then ``environ``, then ``overrides``.

    Raises `ConfigError` naming the key (and the line, for the file).
    """
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        try:
            source = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(source)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    if "auth" in data:
        data = _translate_auth(data, path)
    env = os.environ if environ is None else environ
    from_env: dict[str, Any] = {}
    for variable, key in ENVIRONMENT.items():
        value = env.get(variable)
        if value is not None and value != "":
            from_env[key] = value
    tls_env = {key: env[var] for var, key in TLS_ENVIRONMENT.items() if env.get(var)}
    try:
        # Environment values are strings: msgspec coerces them (strict=False),
        # and only them, so a file that says port = "9000" is still an error.
        typed = msgspec.convert(from_env, _EnvView, strict=False)
        env_part = {key: getattr(typed, key) for key in from_env}
        merged = _with_instance_defaults({**data, **env_part, **(overrides or {})})
        if tls_env:
            merged["tls"] = {**(merged.get("tls") or {}), **tls_env}
        return msgspec.convert(merged, ManagerConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, path, source, from_env, overrides or {})) from None


def _with_instance_defaults(merged: dict[str, Any]) -> dict[str, Any]:
    """Seeds that leave out a field of `INSTANCE_DEFAULTS` take the global setting.

    A seed's ``created_at`` (tei-manager's InstanceConfig has one, so seeds
    copied from its state file carry it) is dropped: teisup records when it
    registered the instance.
    """
    seeds = merged.get("instances")
    if not isinstance(seeds, list):
        return merged
    given = {key: merged[name] for key, name in INSTANCE_DEFAULTS.items() if name in merged}
    filled = [
        {**given, **{k: v for k, v in seed.items() if k != "created_at"}}
        if isinstance(seed, dict)
        else seed
        for seed in seeds
    ]
    return {**merged, "instances": filled}


class _EnvView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The environment-settable keys with their types, for coercing strings."""

    api_port: Port | None = None
    grpc_port: Port | None = None
    grpc_enabled: bool | None = None
    grpc_workers: GrpcWorkers | None = None
    state_file: str | None = None
    tei_binary_path: str | None = None
    health_check_interval_secs: ProbeSeconds | None = None
    log_dir: str | None = None
    bind_host: str | None = None
    max_instances: MaxInstances | None = None
    manager_id: str | None = None
    api_token: str | None = None
    api_token_file: str | None = None
    default_instance: bool | None = None


#: ``[tls]`` keys settable from the environment.
TLS_ENVIRONMENT = {
    "TEISUP_TLS_CERT": "cert",
    "TEISUP_TLS_KEY": "key",
    "TEISUP_TLS_CA": "ca",
    "TEISUP_TLS_CLIENT_AUTH": "client_auth",
}


_AUTH_KEYS = {"enabled", "providers", "require_cert_headers", "mtls"}
_MTLS_KEYS = {
    "ca_cert",
    "server_cert",
    "server_key",
    "allow_self_signed",
    "verify_subject",
    "allowed_subjects",
    "verify_san",
    "allowed_sans",
}


def _translate_auth(data: dict[str, Any], path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """tei-manager's ``[auth]`` / ``[auth.mtls]`` as teisup's ``[tls]``, or a clear error.

    Enabled, it becomes client certificates *required* on both servers (where
    tei-manager left gRPC without allow-lists), checked by the TLS handshake
    itself. ``allowed_subjects`` entries are common names; tei-manager's
    substring form ``"CN=name"`` is read as ``name``. What teisup will not do
    is refused rather than dropped: trusting a proxy's ``X-SSL-Client-Cert``
    header, and skipping the issuer check for self-signed client certificates
    (add such a certificate to the CA bundle instead).
    """
    where = f"config file {path}" if path is not None else "configuration"
    data = dict(data)
    auth = data.pop("auth")
    if not isinstance(auth, dict):
        raise ConfigError(f"{where}: [auth] must be a table")
    _known_keys(auth, _AUTH_KEYS, f"{where}: [auth]")
    if not auth.get("enabled", False):
        return data  # tei-manager ignores a disabled section too
    if "tls" in data:
        raise ConfigError(f"{where}: set [tls] or tei-manager's [auth.mtls], not both")
    if "mtls" not in auth.get("providers", []):
        raise ConfigError(f'{where}: [auth] enabled = true needs providers = ["mtls"]')
    if auth.get("require_cert_headers", False):
        raise ConfigError(
            f"{where}: [auth] require_cert_headers: teisup checks client certificates in its own "
            "TLS handshake and never trusts a proxy's X-SSL-Client-Cert header; remove the key "
            "and let clients connect with their certificates"
        )
    mtls = auth.get("mtls")
    if not isinstance(mtls, dict):
        raise ConfigError(f"{where}: [auth] with the mtls provider needs an [auth.mtls] table")
    _known_keys(mtls, _MTLS_KEYS, f"{where}: [auth.mtls]")
    missing = [k for k in ("ca_cert", "server_cert", "server_key") if not mtls.get(k)]
    if missing:
        raise ConfigError(f"{where}: [auth.mtls] needs {missing[0]}")
    if mtls.get("allow_self_signed", False):
        raise ConfigError(
            f"{where}: [auth.mtls] allow_self_signed: teisup verifies every client certificate "
            "against the CA bundle; add a self-signed client certificate to ca_cert instead"
        )
    subjects = [
        _common_name(str(s))
        for s in mtls.get("allowed_subjects", [])
        if mtls.get("verify_subject", True)
    ]
    sans = [
        str(s).removeprefix("DNS:")
        for s in mtls.get("allowed_sans", [])
        if mtls.get("verify_san", False)
    ]
    data["tls"] = {
        "cert": mtls["server_cert"],
        "key": mtls["server_key"],
        "ca": mtls["ca_cert"],
        "client_auth": "required",
        "allowed_subjects": subjects,
        "allowed_sans": sans,
    }
    return data


def _known_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")


def _common_name(entry: str) -> str:
    match = re.search(r"(?:^|[,/]\s*)CN=([^,/]+)", entry)
    return match.group(1).strip() if match else entry.strip()


_PATH = re.compile(r"at `\$((?:\.[A-Za-z_][\w-]*|\[\d+\])+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _explain(
    exc: msgspec.ValidationError,
    path: str | os.PathLike[str] | None,
    source: str,
    from_env: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> str:
    message = worded_error(str(exc))
    keys: list[str | int] = []
    if m := _PATH.search(message):
        for part in re.findall(r"\.([\w-]+)|\[(\d+)\]", m.group(1)):
            keys.append(part[0] if part[0] else int(part[1]))
    if m := _UNKNOWN.search(message):
        keys.append(m.group(1))
    top = keys[0] if keys else None
    env_names = [v for v, k in ENVIRONMENT.items() if k == top and k in from_env]
    if isinstance(top, str) and top in overrides:
        # Overrides are the command line's flags (--api-port for api_port).
        return f"flag --{top.replace('_', '-')}: {message}"
    if env_names:
        return f"environment variable {env_names[0]}: {message}"
    if path is None:
        return f"configuration: {message}"
    line = _find_line(source, keys)
    return f"config file {path}" + (f", line {line}" if line else "") + f": {message}"


def _find_line(source: str, keys: list[str | int]) -> int | None:
    """Best effort: the line where the last key of ``keys`` is set."""
    lines = source.splitlines()
    start = 0
    # Narrow to the n-th [[table]] when the path goes through an array of tables.
    for i, key in enumerate(keys):
        if isinstance(key, int) and i > 0 and isinstance(keys[i - 1], str):
            header = re.compile(rf"^\s*\[\[\s*{re.escape(str(keys[i - 1]))}\s*\]\]")
            seen = -1
            for number, text in enumerate(lines):
                if header.match(text):
                    seen += 1
                    if seen == key:
                        start = number
                        break
    names = [k for k in keys if isinstance(k, str)]
    if not names:
        return None
    target = re.compile(rf"^\s*\"?{re.escape(names[-1])}\"?\s*=|^\s*\[+\s*{re.escape(names[-1])}")
    for number in range(start, len(lines)):
        if target.match(lines[number]):
            return number + 1
    return None
