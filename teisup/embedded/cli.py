"""TEI 1.9.3's router command line (``text-embeddings-router``), parsed as clap does.

Every option also reads the UPPER_SNAKE environment variable of its name
(``--max-batch-tokens`` <-> ``MAX_BATCH_TOKENS``); the command line wins over
the environment. Usage errors print a usage line and ``error: ...`` on stderr
and exit 2, as clap does: an unknown flag, a missing or malformed value, a
boolean variable that is not exactly ``true`` or ``false``, no ``--model-id``
(nor ``MODEL_ID``), or both ``--default-prompt`` and ``--default-prompt-name``.

What 1.9 changed from 1.8.3, and this follows: ``--model-id`` is required (no
default model); ``--auto-truncate`` defaults to true and takes an optional
value (``--auto-truncate``, ``--auto-truncate true``, ``--auto-truncate
false``); ``--served-model-name`` names the model for OpenAI's ``model`` field.

Nothing here imports torch, so a usage error exits in milliseconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from teisup import __version__

__all__ = [
    "INFO_VERSION",
    "TEI_VERSION",
    "Settings",
    "available_cpus",
    "build_parser",
    "parse_settings",
]

log = logging.getLogger(__name__)

TEI_VERSION = "1.9.3"
"""The TEI release whose CLI and gRPC protocol this backend speaks."""

INFO_VERSION = f"{TEI_VERSION}+teisup.{__version__}"
"""``Info.version`` and ``--version``: TEI's version, teisup's as semver build metadata.

A client comparing versions (``>= 1.9``) reads 1.9.3; a person sees it is teisup.
"""

_POOLINGS = ("cls", "mean", "splade", "last-token")
_DTYPES = ("float16", "float32", "bfloat16")


@dataclass(frozen=True)
class Settings:
    """The parsed router options, with TEI's defaults filled in."""

    model_id: str
    revision: str | None = None
    tokenization_workers: int | None = None
    dtype: str | None = None
    pooling: str | None = None
    max_concurrent_requests: int = 512
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    auto_truncate: bool = True
    default_prompt_name: str | None = None
    default_prompt: str | None = None
    dense_path: str | None = None
    hf_api_token: str | None = None
    hf_token: str | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    uds_path: str = "/tmp/text-embeddings-inference-server"
    huggingface_hub_cache: str | None = None
    payload_limit: int = 2_000_000
    api_key: str | None = None
    json_output: bool = False
    disable_spans: bool = False
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-embeddings-inference.server"
    prometheus_port: int = 9000
    cors_allow_origin: tuple[str, ...] | None = None
    served_model_name: str | None = None

    @property
    def workers(self) -> int:
        """``--tokenization-workers``, defaulting to the CPUs this process may use, as TEI's."""
        return self.tokenization_workers or available_cpus()

    @property
    def model_name(self) -> str:
        """The name OpenAI clients see as ``model``: ``--served-model-name``, else the id."""
        return self.served_model_name or self.model_id


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may run on, as Rust's ``num_cpus::get()`` counts them.

    That is TEI's default for ``--tokenization-workers``: the CPUs in the
    process's affinity mask, lowered to a cgroup v2 CPU quota (``cpu.max``,
    rounded up) when one is set, as in a container started with ``--cpus``.
    ``os.cpu_count()`` would count every CPU of the machine instead.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return max(count, 1)
    if quota != "max" and int(period) > 0:
        count = min(count, max(1, -(-int(quota) // int(period))))
    return max(count, 1)


def _unsigned(bits: int) -> type[int] | object:
    limit = 2**bits

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid digit found in string: {text!r}") from None
        if not 0 <= value < limit:
            raise argparse.ArgumentTypeError(f"{value} is not in 0..={limit - 1}")
        return value

    return parse


def _bool_value(text: str) -> bool:
    """An optional boolean flag value (``--auto-truncate false``): exactly true or false."""
    if text in ("true", "false"):
        return text == "true"
    raise argparse.ArgumentTypeError(f"invalid value {text!r}: possible values: true, false")


def _bool_env(name: str, text: str) -> bool:
    # clap's BoolValueParser: exactly "true" or "false", nothing else.
    if text == "true":
        return True
    if text == "false":
        return False
    raise argparse.ArgumentTypeError(
        f"invalid value {text!r} for {name}: possible values: true, false"
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own exit is already 2; this only keeps clap's lower-case "error:".
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for TEI's flags (no environment handling)."""
    p = _Parser(
        prog="text-embeddings-router",
        description="Text Embedding Webserver (teisup's embedded backend)",
        allow_abbrev=False,  # clap never guesses a long flag from a prefix
        argument_default=argparse.SUPPRESS,  # unset flags fall back to env, then defaults
    )
    u16, _u32, usize = _unsigned(16), _unsigned(32), _unsigned(64)
    p.add_argument(
        "-V", "--version", action="version", version=f"text-embeddings-router {INFO_VERSION}"
    )
    # Required since 1.9.0 (it may come from MODEL_ID): checked once env is read.
    p.add_argument("--model-id")
    p.add_argument("--revision")
    p.add_argument("--tokenization-workers", type=usize)  # type: ignore[arg-type]
    p.add_argument("--dtype", choices=_DTYPES)
    p.add_argument("--pooling", choices=_POOLINGS)
    p.add_argument("--max-concurrent-requests", type=usize)  # type: ignore[arg-type]
    p.add_argument("--max-batch-tokens", type=usize)  # type: ignore[arg-type]
    p.add_argument("--max-batch-requests", type=usize)  # type: ignore[arg-type]
    p.add_argument("--max-client-batch-size", type=usize)  # type: ignore[arg-type]
    # 1.9: true by default; a bare flag means true, or it takes true/false.
    p.add_argument(
        "--auto-truncate", nargs="?", const=True, type=_bool_value, metavar="<AUTO_TRUNCATE>"
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--default-prompt-name")
    prompt.add_argument("--default-prompt")
    p.add_argument("--dense-path")
    p.add_argument("--hf-api-token", help=argparse.SUPPRESS)
    p.add_argument("--hf-token")
    p.add_argument("--hostname")
    p.add_argument("-p", "--port", type=u16)  # type: ignore[arg-type]
    p.add_argument("--uds-path")
    p.add_argument("--huggingface-hub-cache")
    p.add_argument("--payload-limit", type=usize)  # type: ignore[arg-type]
    p.add_argument("--api-key")
    p.add_argument("--json-output", action="store_true")
    p.add_argument("--disable-spans", action="store_true")
    p.add_argument("--otlp-endpoint")
    p.add_argument("--otlp-service-name")
    p.add_argument("--prometheus-port", type=u16)  # type: ignore[arg-type]
    p.add_argument("--cors-allow-origin", action="append")
    p.add_argument("--served-model-name")
    return p


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Parse ``argv`` (default ``sys.argv[1:]``) and ``env`` (default ``os.environ``).

    Exits 2 (``SystemExit``) on a usage error and 0 after ``--help``/``--version``.
    """
    environ = os.environ if env is None else env
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    values: dict[str, object] = {}
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "version"):
            continue
        if dest in given:
            values[dest] = given[dest]
            continue
        name = dest.upper()
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            if isinstance(action, argparse._StoreTrueAction) or action.type is _bool_value:
                values[dest] = _bool_env(name, raw)
            elif isinstance(action, argparse._AppendAction):
                values[dest] = [raw]
            elif action.type is not None:
                values[dest] = action.type(raw)  # type: ignore[operator]
            else:
                values[dest] = raw
        except argparse.ArgumentTypeError as exc:
            parser.error(f"invalid value {raw!r} for '{_flag(action)}' (from {name}): {exc}")
        if action.choices is not None and values[dest] not in action.choices:
            choices = ", ".join(map(str, action.choices))
            parser.error(
                f"invalid value {raw!r} for '{_flag(action)}' (from {name}): "
                f"possible values: {choices}"
            )
    # The mutual exclusion argparse enforces on the command line, also across env.
    if values.get("default_prompt") is not None and values.get("default_prompt_name") is not None:
        parser.error(
            "the argument '--default-prompt <DEFAULT_PROMPT>' cannot be used with "
            "'--default-prompt-name <DEFAULT_PROMPT_NAME>'"
        )
    if values.get("model_id") is None:
        parser.error("the following required arguments were not provided:\n  --model-id <MODEL_ID>")
    hostname = values.get("hostname")
    if isinstance(hostname, str):
        try:
            ipaddress.ip_address(hostname)
        except ValueError:
            # TEI warns and falls back rather than failing (Docker sets HOSTNAME).
            log.warning("Invalid hostname, defaulting to 0.0.0.0")
            values["hostname"] = "0.0.0.0"
    if isinstance(values.get("cors_allow_origin"), list):
        values["cors_allow_origin"] = tuple(values["cors_allow_origin"])  # type: ignore[arg-type]
    return Settings(**values)  # type: ignore[arg-type]


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)
