"""Injection: names, model ids, revisions and extra args that try to escape.

Instance names may not reach outside the log directory; model ids and
revisions may not smuggle flags or shell syntax; extra args reach the router as
inert argv items and can never override a flag the manager sets, so an
instance always listens on loopback only. Mostly pure (spec and argv); two
tests spawn a process to show that shell syntax stays inert text.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from teisup.embedded.cli import build_parser, parse_settings
from teisup.instances.launch import INSTANCE_HOST, build_argv, build_env
from teisup.instances.logs import InstanceLog
from teisup.instances.process import ProcessSpawner, kill_group, wait_for_exit
from teisup.instances.spec import (
    EXITING_FLAGS,
    FIELD_FLAGS,
    NAME_PATTERN,
    OWNED_FLAGS,
    InstanceSpec,
    check_extra_args,
    spec_from_dict,
)

from .conftest import FAKE_TEI

MODEL = "BAAI/bge-small-en-v1.5"
PORT, METRICS_PORT = 18080, 19100


def refused(patch: dict[str, object]) -> str:
    """The validation message for a spec with ``patch`` applied (it must fail)."""
    with pytest.raises(msgspec.ValidationError) as caught:
        spec_from_dict({"name": "ok", "model_id": MODEL, **patch})
    return str(caught.value)


def argv_of(**fields: object) -> list[str]:
    spec = spec_from_dict({"name": "ok", "model_id": MODEL, **fields})
    return build_argv(["tei"], spec, PORT, METRICS_PORT)


# --------------------------------------------------------------------------- names

BAD_NAMES = [
    "../x",
    "../../etc/passwd",
    "a/b",
    "/abs",
    ".",
    "..",
    ".hidden",
    "a\0b",
    "-lead",
    "--port",
    " a",
    "a b",
    "a\tb",
    "a\n",
    "A",
    "a\\b",
    "a;b",
    "$(x)",
    "",
    "x" * 64,
    "x" * 10_000,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_refused_naming_the_field(name: str) -> None:
    assert "$.name" in refused({"name": name})
    with pytest.raises(ValueError, match="name"):
        InstanceSpec(name=name, model_id=MODEL)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(NAME_PATTERN, fullmatch=True))
def test_every_valid_name_logs_inside_the_log_directory(name: str) -> None:
    directory = Path("/var/log/teisup")
    spec = spec_from_dict({"name": name, "model_id": MODEL})
    path = InstanceLog(spec.name, directory=directory).path
    assert path is not None
    assert path.parent == directory
    assert os.path.normpath(path) == str(path)  # no "..", no "."
    assert path.name == f"{name}.log"


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "a\0b", ""])
def test_the_log_itself_refuses_a_traversing_name(name: str) -> None:
    # Defence in depth: specs never carry these, but the log refuses them too.
    with pytest.raises(ValueError, match="log file name"):
        InstanceLog(name, directory="/var/log/teisup")


# --------------------------------------------------------------------------- model ids

GOOD_MODEL_IDS = [
    "sentence-transformers/all-MiniLM-L6-v2",
    "BAAI/bge-small-en-v1.5",
    "intfloat/multilingual-e5-large",
    "org/name@rev",
    "m",
    "/data/models/bge",
    "/data/models/bge_v1.5+fp16",
    "./models/x",
    "../models/x",  # a path the user chose, like any absolute one
    "/données/modèle",
]
BAD_MODEL_IDS = [
    ("-x", "must not start with '-'"),
    ("--trust-remote-code", "must not start with '-'"),
    ("--model-id=evil", "must not start with '-'"),
    ("a\nb", "line breaks"),
    ("a\rb", "line breaks"),
    ("a\0b", "line breaks"),
    ("   ", "must not be empty"),
    ("a b", "model_id"),
    ("a\tb", "model_id"),
    ("a\u00a0b", "model_id"),
    ("a\u2028b", "model_id"),
    ("a\x1b[31mb", "model_id"),
    ("x; touch /tmp/pwned", "model_id"),
    ("$(touch /tmp/pwned)", "model_id"),
    ("`id`", "model_id"),
    ("a|b", "model_id"),
    ("a&&b", "model_id"),
    ("a>b", "model_id"),
    ("a'b", "model_id"),
    ('a"b', "model_id"),
    ("a\\b", "model_id"),
    ("~/models", "model_id"),
    ("*", "model_id"),
    ("x" * 1025, "model_id"),
]


@pytest.mark.parametrize("model_id", GOOD_MODEL_IDS)
def test_model_ids_and_local_paths_pass_as_one_argv_item(model_id: str) -> None:
    argv = argv_of(model_id=model_id)
    at = argv.index("--model-id")
    assert argv[at + 1] == model_id
    assert argv.count("--model-id") == 1


@pytest.mark.parametrize(("model_id", "message"), BAD_MODEL_IDS)
def test_model_ids_that_smuggle_flags_or_shell_syntax_are_refused(
    model_id: str, message: str
) -> None:
    text = refused({"model_id": model_id})
    assert message in text
    assert "model_id" in text
    with pytest.raises(ValueError, match="model_id"):
        InstanceSpec(name="ok", model_id=model_id)


@pytest.mark.parametrize("revision", ["main", "refs/pr/2", "v1.0", "a" * 40])
def test_revisions_pass_as_one_argv_item(revision: str) -> None:
    argv = argv_of(revision=revision)
    assert argv[argv.index("--revision") + 1] == revision


@pytest.mark.parametrize(
    "revision", ["-x", "--port=1", "main; rm -rf /", "a b", "a\nb", "$(id)", "x" * 257]
)
def test_revisions_that_smuggle_flags_or_shell_syntax_are_refused(revision: str) -> None:
    assert "revision" in refused({"revision": revision})


# --------------------------------------------------------------------------- extra args

REFUSED_EXTRA_ARGS = [
    # The manager's flags, in every form a parser accepts.
    (["--port", "1"], "--port: the manager owns it"),
    (["--port=1"], "--port: the manager owns it"),
    (["-p", "1"], "-p: the manager owns it"),
    (["-p1"], "-p: the manager owns it"),
    (["-p=1"], "-p: the manager owns it"),
    (["--hostname", "0.0.0.0"], "--hostname: the manager owns it"),
    (["--hostname=0.0.0.0"], "--hostname: the manager owns it"),
    (["--hostname=::"], "--hostname: the manager owns it"),
    (["--model-id", "evil/model"], "--model-id: the manager owns it"),
    (["--model-id=evil/model"], "--model-id: the manager owns it"),
    (["--prometheus-port", "9"], "--prometheus-port: the manager owns it"),
    (["--prometheus-port=9"], "--prometheus-port: the manager owns it"),
    (["--json-output"], "--json-output: the manager owns it"),
    # Smuggled as the value of an innocent flag: still a flag to a parser.
    (["--default-prompt", "--port", "1"], "--port: the manager owns it"),
    (["--default-prompt", "--hostname=0.0.0.0"], "--hostname: the manager owns it"),
    # Spellings a lenient parser might take for them.
    (["--PORT", "1"], "--PORT (read as --port): the manager owns it"),
    (["--Hostname=0.0.0.0"], "(read as --hostname): the manager owns it"),
    (["--model_id", "x"], "(read as --model-id): the manager owns it"),
    (["--host", "0.0.0.0"], "--host (read as --hostname): the manager owns it"),
    (["--hostn=0.0.0.0"], "(read as --hostname): the manager owns it"),
    (["--po", "1"], "(read as --port): the manager owns it"),
    (["--prom=9"], "(read as --prometheus-port): the manager owns it"),
    (["--model", "x"], "(read as --model-id): the manager owns it"),
    (["-xp8080"], "-xp8080 (read as -p): the manager owns it"),
    # Flags with a field of their own, and flags that make the router exit.
    (["--pooling", "cls"], "use the field 'pooling'"),
    (["--max-batch-tokens=1"], "use the field 'max_batch_tokens'"),
    (["--pool", "cls"], "(read as --pooling): use the field 'pooling'"),
    (["--help"], "exit at once"),
    (["-h"], "exit at once"),
    (["-V"], "exit at once"),
    (["--version"], "exit at once"),
    (["--vers"], "(read as --version): the router would exit at once"),
    # Not a flag at all, or not one item.
    (["--"], "would end the router's options"),
    (["--port 1"], "is not a flag"),
    (["--hostname 0.0.0.0"], "is not a flag"),
    (["--a;b"], "is not a flag"),
    (["--$(id)"], "is not a flag"),
    (["float16"], "must start with a flag"),
    (["; touch /tmp/pwned"], "must start with a flag"),
    # Characters that cannot travel in argv, or would forge log lines.
    (["--default-prompt", "a\0b"], "control characters"),
    (["--default-prompt", "a\nb"], "control characters"),
    (["--default-prompt", "a\r\n--port=1"], "control characters"),
    (["--default-prompt", "\x1b[2J"], "control characters"),
    (["--default-prompt", "a\u2028b"], "control characters"),
]


@pytest.mark.parametrize(("extra_args", "message"), REFUSED_EXTRA_ARGS)
def test_extra_args_that_override_or_smuggle_are_refused(
    extra_args: list[str], message: str
) -> None:
    text = refused({"extra_args": extra_args})
    assert message in text
    assert "extra_args" in text  # the field is named, for the API's 422
    with pytest.raises(ValueError, match="extra_args"):
        InstanceSpec(name="ok", model_id=MODEL, extra_args=extra_args)


INERT_EXTRA_ARGS = [
    ["--default-prompt", "; touch /tmp/pwned"],
    ["--default-prompt", "$(touch /tmp/pwned)"],
    ["--default-prompt", "`touch /tmp/pwned`"],
    ["--default-prompt", "a && b || c | d > /tmp/out < /etc/passwd &"],
    ["--default-prompt", "'quoted' \"double\" \\back $HOME ${IFS} * ? ~ #"],
    ["--default-prompt", "query: "],
    ["--default-prompt=--port 1"],  # a value attached to its flag stays a value
    ["--otlp-service-name", "x", "--cors-allow-origin", "*"],
    ["--tokenization-workers", "2"],
    ["--payload-limit", "-1"],  # a negative number is a value, not a flag
    ["--default-prompt", ""],
    ["--disable-spans"],
]


@pytest.mark.parametrize("extra_args", INERT_EXTRA_ARGS)
def test_accepted_extra_args_are_appended_item_for_item(extra_args: list[str]) -> None:
    argv = argv_of(extra_args=extra_args)
    assert argv[len(argv) - len(extra_args) :] == extra_args


def test_every_router_flag_the_manager_leaves_alone_is_still_accepted() -> None:
    protected = OWNED_FLAGS | FIELD_FLAGS.keys() | EXITING_FLAGS
    flags = [
        flag
        for action in build_parser()._actions
        for flag in action.option_strings
        if flag not in protected
    ]
    assert "--tokenization-workers" in flags
    assert "--uds-path" in flags
    for flag in flags:
        check_extra_args([flag])
        check_extra_args([flag, "value"])
        check_extra_args([f"{flag}=value"])


def test_the_router_listens_on_loopback_only() -> None:
    argv = argv_of(extra_args=["--cors-allow-origin", "*"])
    assert argv.count("--hostname") == 1
    assert argv[argv.index("--hostname") + 1] == INSTANCE_HOST == "127.0.0.1"
    for flag in ("--port", "--prometheus-port", "--model-id"):
        assert argv.count(flag) == 1
    assert not any(arg.startswith(("--hostname=", "--port=", "-p")) for arg in argv)
    # The environment cannot set it either: TEI reads HOSTNAME and PORT.
    spec = spec_from_dict({"name": "ok", "model_id": MODEL})
    env = build_env({"HOSTNAME": "0.0.0.0", "PORT": "80", "PATH": "/bin"}, spec, "m")
    assert "HOSTNAME" not in env
    assert "PORT" not in env


def test_a_spec_whose_list_was_changed_afterwards_is_refused_at_launch() -> None:
    spec = spec_from_dict({"name": "ok", "model_id": MODEL})
    spec.extra_args.extend(["--hostname", "0.0.0.0"])  # frozen Struct, mutable list
    with pytest.raises(ValueError, match="--hostname: the manager owns it"):
        build_argv(["tei"], spec, PORT, METRICS_PORT)


# Items a hostile request might combine: every router flag and abbreviations,
# case and underscore variants, attached values, clusters, shell syntax.
_ROUTER_FLAGS = sorted({f for a in build_parser()._actions for f in a.option_strings})
_FLAGISH = st.sampled_from(_ROUTER_FLAGS).flatmap(
    lambda flag: st.sampled_from(
        [
            flag,
            flag.upper(),
            flag.replace("-", "_"),
            flag[: max(3, len(flag) // 2)],
            f"{flag}=0.0.0.0",
            f"{flag}=1",
            f"-x{flag[1:]}",
        ]
    )
)
_ITEMS = st.one_of(
    _FLAGISH,
    st.sampled_from(["0.0.0.0", "1", "-1", "-p", "-p1", "-Vp", "--", "-", "; id", "$(id)"]),
    st.text(max_size=12),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_ITEMS, max_size=6))
def test_whatever_extra_args_pass_the_router_keeps_the_managers_flags(
    extra_args: list[str],
) -> None:
    try:
        spec = spec_from_dict({"name": "ok", "model_id": MODEL, "extra_args": extra_args})
    except msgspec.ValidationError:
        return
    argv = build_argv(["tei"], spec, PORT, METRICS_PORT)
    try:
        # The embedded backend's parser, which reads the command line as TEI's clap does.
        settings_ = parse_settings(argv[1:], env={})
    except SystemExit as exit:
        usage_error = exit.code
    else:
        usage_error = None
    if usage_error is not None:
        assert usage_error == 2  # never --help or --version (exit 0)
        return
    assert settings_.hostname == "127.0.0.1"
    assert (settings_.port, settings_.prometheus_port) == (PORT, METRICS_PORT)
    assert settings_.model_id == MODEL
    assert settings_.json_output is True


# --------------------------------------------------------------------------- real processes

ARGV_ECHO = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
SHELL_SYNTAX = [
    "--default-prompt",
    "; touch pwned-1",
    "--otlp-service-name",
    "$(touch pwned-2)",
    "--api-key",
    "`touch pwned-3` && touch pwned-4 | tee pwned-5 > pwned-6",
]


async def first_stdout_line(argv: list[str], env: dict[str, str], cwd: Path) -> bytes:
    async with ProcessSpawner() as spawner:
        process = await spawner.spawn(argv, env, cwd=str(cwd))
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            with trio.fail_after(30):
                line = await trio.to_thread.run_sync(process.stdout.readline)
        finally:
            kill_group(process.pid, signal.SIGKILL)
            await wait_for_exit(process)
            process.stdout.close()
            process.stderr.close()
    return line


async def test_shell_syntax_in_extra_args_reaches_the_child_as_inert_argv_items(
    tmp_path: Path,
) -> None:
    spec = spec_from_dict({"name": "ok", "model_id": MODEL, "extra_args": SHELL_SYNTAX})
    argv = build_argv(ARGV_ECHO, spec, PORT, METRICS_PORT)
    env = build_env(os.environ, spec, "test-injection")
    line = await first_stdout_line(argv, env, tmp_path)
    assert json.loads(line) == argv[len(ARGV_ECHO) :]
    assert os.listdir(tmp_path) == []  # nothing was run: no file appeared


async def test_the_tei_double_reads_shell_syntax_as_plain_values(tmp_path: Path) -> None:
    spec = spec_from_dict({"name": "ok", "model_id": MODEL, "extra_args": SHELL_SYNTAX})
    argv = build_argv(FAKE_TEI, spec, PORT, METRICS_PORT)
    env = {**build_env(os.environ, spec, "test-injection"), "FAKE_TEI_START_DELAY": "60"}
    args_line = json.loads(await first_stdout_line(argv, env, tmp_path))["message"]
    assert args_line.startswith("Args {")
    assert 'default_prompt: "; touch pwned-1"' in args_line
    assert 'otlp_service_name: "$(touch pwned-2)"' in args_line
    assert 'hostname: "127.0.0.1"' in args_line
    assert f"port: {PORT}," in args_line
    assert os.listdir(tmp_path) == []
