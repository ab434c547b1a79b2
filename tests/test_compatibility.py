"""docs/COMPATIBILITY.md is true, and teisup answers as tei-manager 0.12 would.

The table's rows name routes, config keys, environment variables, flags,
fields, metrics and gRPC methods: each one a row calls anything but
``missing`` must exist in teisup as served (routes from the application's
url_map, keys as the config loader takes them), and everything teisup has of
those kinds must have a row. Then what a tei-manager user checks: a typed
client's view of an instance (a five-value status enum, an unsigned integer
uptime), ``--port``, and JSON logs by default.
"""

from __future__ import annotations

import enum
import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import msgspec
import pytest
import trio
from prometheus_client import generate_latest

from teisup.api import create_app, openapi_document
from teisup.api.errors import Error
from teisup.api.openapi import LogsResponse
from teisup.api.views import instance_view
from teisup.bench import build_parser as build_bench_parser
from teisup.cli import build_parser
from teisup.embedded.cli import build_parser as build_router_parser
from teisup.instances import Desired, InstanceInfo, InstanceSpec
from teisup.proto.tei.v1 import tei_pb2
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2
from teisup.security import AllowList
from teisup.service import ManagerConfig
from teisup.service.config import _AUTH_KEYS, _MTLS_KEYS, ENVIRONMENT, TLS_ENVIRONMENT
from teisup.service.metrics import Metrics
from teisup.supervision import ChildState

DOC = Path(__file__).resolve().parents[1] / "docs" / "COMPATIBILITY.md"
STATUSES = {"same", "differs on purpose", "teisup only", "missing"}
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Row:
    area: str
    item: str
    status: str
    notes: str

    @property
    def names(self) -> list[str]:
        """The backticked names of the item."""
        return re.findall(r"`([^`]+)`", self.item)


def rows() -> list[Row]:
    out = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4 or cells[0] in ("Area", "---"):
            continue
        out.append(Row(*cells))
    return out


def present(area: str) -> list[Row]:
    """The rows of ``area`` that say the item exists."""
    return [r for r in rows() if r.area == area and r.status != "missing"]


def named(area: str) -> set[str]:
    """Every name the rows of ``area`` mention, missing or not."""
    return {name for r in rows() if r.area == area for name in r.names}


class _Plane:
    """What create_app reads while building its routes (nothing is served)."""

    manager: Any = None
    root: Any = None
    api_token = None
    protect_health_and_metrics = False
    data_plane: Any = object()
    data_body_limit = 1 << 20
    allow_list = AllowList()
    tls = None
    instance_defaults = MappingProxyType({})


def served_routes() -> set[str]:
    app = create_app(_Plane())  # type: ignore[arg-type]
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method in HTTP_METHODS:
                served.add(f"{method} {path}")
    return served


def test_every_row_has_a_known_status_and_says_why_where_it_differs() -> None:
    table = rows()
    assert len(table) > 100
    for row in table:
        assert row.status in STATUSES, row
        if row.status == "differs on purpose":
            assert len(row.notes) > 20, f"say why: {row}"
    items = [(r.area, r.item) for r in table]
    assert len(items) == len(set(items)), "a row is there twice"


def test_nothing_of_tei_manager_or_tei_is_missing() -> None:
    missing = [f"{r.area} {r.item}" for r in rows() if r.status == "missing"]
    assert not missing, missing


def test_every_route_it_lists_is_served_and_every_served_route_is_listed() -> None:
    served = served_routes()
    listed: set[str] = set()
    for row in rows():
        if row.area not in ("rest", "data"):
            continue
        for name in row.names:
            if name.split(" ", 1)[0] in HTTP_METHODS:
                route = name.split("?", 1)[0]
                listed.add(route)
                if row.status != "missing":
                    assert route in served, f"{row.item}: not served"
    unlisted = served - listed
    assert not unlisted, f"add rows to docs/COMPATIBILITY.md for {sorted(unlisted)}"


def _config_key_exists(key: str) -> bool:
    parts = key.split(".")
    if parts[0] == "auth":
        tables = {1: {"auth"}, 2: _AUTH_KEYS, 3: _MTLS_KEYS if parts[1:2] == ["mtls"] else set()}
        return parts[-1] in tables[len(parts)] or (len(parts) == 2 and parts[1] == "mtls")
    return len(parts) == 1 and key in ManagerConfig.__struct_fields__


def test_every_config_key_it_lists_is_read_and_every_key_is_listed() -> None:
    for row in present("config"):
        for key in row.names:
            assert _config_key_exists(key), f"{row.item}: no such config key"
    unlisted = set(ManagerConfig.__struct_fields__) - named("config")
    assert not unlisted, f"add rows to docs/COMPATIBILITY.md for config keys {sorted(unlisted)}"
    # The sub-keys of tei-manager's [auth] section, every one.
    auth = {f"auth.{k}" for k in _AUTH_KEYS - {"mtls"}} | {f"auth.mtls.{k}" for k in _MTLS_KEYS}
    assert auth <= named("config")


def test_every_environment_variable_it_lists_is_read_and_every_one_is_listed() -> None:
    loader = set(ENVIRONMENT) | set(TLS_ENVIRONMENT)
    for row in present("env"):
        for variable in row.names:
            if variable.startswith(("TEI_", "TEISUP_")):
                assert variable in loader, f"{row.item}: the loader does not read it"
    unlisted = loader - named("env")
    assert not unlisted, f"add rows to docs/COMPATIBILITY.md for {sorted(unlisted)}"


def test_an_environment_variable_sets_its_key() -> None:
    from teisup.service import load_config

    config = load_config(environ={"TEI_MANAGER_API_PORT": "9100", "TEI_MANAGER_LOG_DIR": "/x"})
    assert (config.api_port, config.log_dir) == (9100, "/x")


def test_every_flag_it_lists_is_taken_and_every_flag_is_listed() -> None:
    parser = build_parser()
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    commands = {c for a in parser._actions if not a.option_strings for c in (a.choices or ())}
    for row in present("cli"):
        for name in row.names:
            assert name in flags | commands, f"{row.item}: teisup does not take it"
    unlisted = (flags | commands) - named("cli")
    assert not unlisted, f"add rows to docs/COMPATIBILITY.md for {sorted(unlisted)}"


def test_every_tei_router_flag_it_lists_is_taken() -> None:
    parser = build_router_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    for row in present("tei-cli"):
        for name in row.names:
            assert name in flags, f"{row.item}: the embedded backend does not take it"
    unlisted = {f for f in flags if f.startswith("--")} - named("tei-cli") - {"--help"}
    unlisted -= {"--hf-api-token", "--version"}  # hidden and deprecated in TEI; --version: TEI's
    assert not unlisted, f"add rows to docs/COMPATIBILITY.md for {sorted(unlisted)}"


def test_every_bench_client_flag_it_lists_is_taken_and_every_flag_is_listed() -> None:
    parser = build_bench_parser()
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    for row in present("bench"):
        for name in row.names:
            if name.startswith("-"):
                assert name in flags, f"{row.item}: teisup-bench does not take it"
    assert not flags - named("bench"), sorted(flags - named("bench"))


def test_every_metric_it_lists_is_served() -> None:
    metrics = Metrics(instances=lambda: [], gpus=lambda: [])
    text = generate_latest(metrics.registry).decode()
    # A counter's family may be named with or without the _total of its sample.
    types = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    names = types | {f"{n}_total" for n in types}
    for row in present("metric"):
        for name in row.names:
            assert name in names, f"{row.item}: not on /metrics"
        for name in re.findall(r"`(teisup_[a-z_]+)`", row.notes):
            assert name in names, f"{row.notes}: {name} not on /metrics"


def _fields() -> dict[str, set[str]]:
    schemas = openapi_document()["components"]["schemas"]
    return {
        "InstanceInfo": set(schemas["InstanceInfo"]["properties"]) | {"durable"},
        "Error": set(Error.__struct_fields__),
        "LogsResponse": set(LogsResponse.__struct_fields__),
        "CreateInstanceRequest": set(InstanceSpec.__struct_fields__),
        "InstanceSpec": set(InstanceSpec.__struct_fields__),
    }


def test_every_field_it_lists_is_answered_and_every_instance_field_is_listed() -> None:
    fields = _fields()
    for row in present("field"):
        struct, *rest = row.names[0].split(".")
        names = rest or row.names[1:]
        assert struct in fields, row
        for name in names:
            assert name in fields[struct], f"{row.item}: {struct} has no {name}"
    listed = {n.split(".", 1)[1] for n in named("field") if n.startswith("InstanceInfo.")}
    unlisted = fields["InstanceInfo"] - listed
    assert not unlisted, f"add rows to docs/COMPATIBILITY.md for InstanceInfo.{sorted(unlisted)}"
    spec = {n for r in rows() if r.area == "field" for n in r.names[1:]}
    assert not fields["InstanceSpec"] - spec, sorted(fields["InstanceSpec"] - spec)


def test_every_grpc_method_and_target_is_listed_and_exists() -> None:
    service = multiplexer_pb2.DESCRIPTOR.services_by_name["TeiMultiplexer"]
    methods = {m.name for m in service.methods}
    target = {f"Target.{f.name}" for f in multiplexer_pb2.Target.DESCRIPTOR.fields}
    for row in present("grpc"):
        for name in row.names:
            if re.fullmatch(r"[A-Z]\w+", name):
                assert name in methods, row
            elif name.startswith("Target."):
                assert name in target, row
            else:
                assert name == service.full_name, row
    assert not methods - named("grpc"), sorted(methods - named("grpc"))
    assert not target - named("grpc"), sorted(target - named("grpc"))
    for row in present("proto"):
        for name in row.names:
            if name.startswith("tei.v1.") and name.count(".") == 3:
                _, _, message, field = name.split(".")
                assert field in tei_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name


# -- as a tei-manager user sees it ------------------------------------------------------------


class TeiManagerStatus(enum.Enum):
    """tei-manager 0.12's InstanceStatus (serde, lowercase): nothing else decodes."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class TeiManagerInstance(msgspec.Struct):
    """tei-manager's InstanceInfo as a typed client declares it (u16, u32, u64)."""

    name: str
    model_id: str
    port: int
    status: TeiManagerStatus
    pid: int | None
    created_at: str | None
    uptime_secs: int
    restarts: int
    health_check_failures: int
    last_health_check: str | None
    gpu_id: int | None
    prometheus_port: int | None

    def __post_init__(self) -> None:
        assert self.uptime_secs >= 0


def _info(state: ChildState, uptime: float | None) -> InstanceInfo:
    spec = InstanceSpec(name="bge-small", model_id="BAAI/bge-small-en-v1.5")
    return InstanceInfo(
        name=spec.name,
        model_id=spec.model_id,
        port=8080,
        status=state,
        pid=4242 if uptime is not None else None,
        created_at="2026-01-01T00:00:00Z",
        uptime_secs=uptime,
        restarts=0,
        health_check_failures=2 if state is ChildState.UNHEALTHY else 0,
        last_health_check=None,
        gpu_id=None,
        prometheus_port=9100,
        restart_policy="permanent",
        restarts_in_window=0,
        next_restart_in=None,
        last_exit=None,
        last_error=None,
        desired=Desired.RUNNING,
        spec=spec,
    )


@pytest.mark.parametrize("state", list(ChildState))
def test_a_typed_tei_manager_client_decodes_an_instance_in_every_state(state: ChildState) -> None:
    uptime = 12.75 if state in (ChildState.RUNNING, ChildState.UNHEALTHY) else None
    body = msgspec.json.encode(instance_view(_info(state, uptime)))
    seen = msgspec.json.decode(body, type=TeiManagerInstance, strict=True)
    renamed = {ChildState.UNHEALTHY: "running", ChildState.BACKOFF: "starting"}
    expected = TeiManagerStatus(renamed.get(state, state.value))
    assert (seen.status, seen.uptime_secs) == (expected, 12 if uptime else 0)
    # teisup's own, beside tei-manager's.
    raw = json.loads(body)
    assert (raw["state"], raw["uptime_seconds"]) == (state.value, uptime)
    keys = list(raw)
    assert keys.index("state") == keys.index("status") + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_teisup_takes_tei_managers_port_flag_and_logs_json_by_default(
    tmp_path: Path,
) -> None:
    port, grpc_port = _free_port(), _free_port()
    argv = [
        sys.executable, "-m", "teisup", "--port", str(port), "--grpc-port", str(grpc_port),
        "--state-file", str(tmp_path / "state.toml"),
    ]  # fmt: skip
    env = {**os.environ, "TEISUP_DEFAULT_INSTANCE": "false", "TEISUP_BIND_HOST": "127.0.0.1"}
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(trio.run_process, argv, env=env, stderr=subprocess.PIPE, check=False)
        )
        assert proc.stderr is not None
        log = b""
        with trio.fail_after(60):
            while b"REST API listening on" not in log:
                chunk = await proc.stderr.receive_some()
                assert chunk, f"teisup exited early: {log.decode()}"
                log += chunk
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            health = await http.get("/health")
            refused = await http.post("/instances", json={"name": "x"})
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(60):
            while chunk := await proc.stderr.receive_some():
                log += chunk
            assert await proc.wait() == 0
    assert health.json()["status"] == "healthy"
    assert (refused.status_code, refused.json()["code"]) == (400, "VALIDATION_ERROR")
    assert "model_id" in refused.json()["error"]
    lines = [json.loads(line) for line in log.decode().splitlines() if line.strip()]
    assert lines, log
    assert all({"timestamp", "level", "message"} <= set(line) for line in lines)


@pytest.mark.parametrize(("given", "level"), [("trace", 10), ("WARN", 30), ("warning", 30)])
def test_tracing_log_levels_are_taken(given: str, level: int) -> None:
    from teisup.cli import LOG_LEVELS

    assert LOG_LEVELS[build_parser().parse_args(["--log-level", given]).log_level] == level


def test_a_seed_and_a_created_instance_take_the_global_timeouts(tmp_path: Path) -> None:
    from teisup.service import load_config

    path = tmp_path / "teisup.toml"
    path.write_text(
        "startup_timeout_secs = 120\ngraceful_shutdown_timeout_secs = 5\n"
        '[[instances]]\nname = "a"\nmodel_id = "m"\n'
        '[[instances]]\nname = "b"\nmodel_id = "m"\nstartup_timeout_secs = 9\n'
        # tei-manager's InstanceConfig key, in seeds copied from its state file.
        'created_at = "2025-11-19T14:38:49Z"\n'
    )
    config = load_config(path, environ={})
    [a, b] = config.instances
    assert (a.startup_timeout_secs, a.stop_grace_secs) == (120, 5)
    assert (b.startup_timeout_secs, b.stop_grace_secs) == (9, 5)
    assert config.instance_defaults() == {"startup_timeout_secs": 120, "stop_grace_secs": 5}
    # Unset, the globals and an instance's own defaults agree.
    spec = InstanceSpec(name="c", model_id="m")
    assert (
        ManagerConfig().startup_timeout_secs,
        ManagerConfig().graceful_shutdown_timeout_secs,
    ) == (
        spec.startup_timeout_secs,
        spec.stop_grace_secs,
    )
    assert ManagerConfig().instance_defaults() == {}


def test_the_state_file_is_tei_managers_where_data_is_writable(tmp_path: Path) -> None:
    from teisup.service.config import default_state_file

    assert default_state_file(str(tmp_path)) == str(tmp_path / "tei-manager-state.toml")
    assert default_state_file(str(tmp_path / "absent")).endswith("teisup/state.toml")
