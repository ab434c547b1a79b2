"""What a user asks for: an instance's spec, validated, and its restart policy.

These Structs are the REST API's request bodies and the state file's records,
so every bad value is refused here with a message that names the field.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import re
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect
import msgspec.structs

from ..supervision import Backoff, Intensity, RestartType

__all__ = [
    "InstanceSpec",
    "RestartBackoff",
    "RestartPolicy",
    "check_bounds",
    "check_extra_args",
    "worded_error",
    "spec_from_dict",
]

#: One regex for msgspec (Python) and the OpenAPI document (ECMAScript, no
#: "\Z"): Python's "$" also matches before a final newline, which the
#: lookahead refuses; in ECMAScript "$" is the end already.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}(?!\n)$"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: The rule of `NAME_PATTERN` in words, for error messages.
NAME_RULE = (
    "1 to 63 characters: lower-case letters, digits, '.', '_' and '-', "
    "starting with a letter or digit"
)


def worded_error(message: str) -> str:
    """A msgspec validation message with the instance-name regex said in words."""
    return message.replace(
        f"Expected `str` matching regex {NAME_PATTERN!r}", f"an instance name must be {NAME_RULE}"
    )


Pooling = Literal["cls", "mean", "splade", "last-token"]
Dtype = Literal["float16", "float32", "bfloat16"]
#: A day: longer start-up or stop budgets, backoffs or intervals are a
#: mistake, not a setting.
MAX_SECONDS = 86400.0
#: A week: the longest window a restart count or a reset looks back over.
MAX_WINDOW_SECONDS = 7 * 86400.0
#: TEI's batch budget is 16384 tokens by default; 2^24 is far past any GPU's.
MAX_BATCH_TOKENS = 1 << 24
#: In-flight requests per instance, and inputs per client batch.
MAX_REQUESTS = 1 << 16
#: More restarts than this within one window is a crash loop, not a policy.
MAX_RESTARTS = 10_000
#: NVML numbers GPUs from 0; no machine has this many.
MAX_GPU_ID = 1023
#: The largest backoff growth factor; 2 is the usual one.
MAX_FACTOR = 10.0

#: 0 means "assign one", as in tei-manager.
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Tokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_TOKENS)]
Requests = Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUESTS)]
#: Seconds, at most a day; NaN and infinities are refused by the bounds.
Delay = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]

#: Flags the manager sets itself; an instance may not override them.
OWNED_FLAGS = frozenset(
    {
        "--model-id",
        "--port",
        "-p",
        "--hostname",
        "--prometheus-port",
        "--json-output",
    }
)
#: Flags that have a spec field of their own: use the field.
FIELD_FLAGS = {
    "--max-batch-tokens": "max_batch_tokens",
    "--max-concurrent-requests": "max_concurrent_requests",
    "--pooling": "pooling",
    "--revision": "revision",
    "--dtype": "dtype",
    "--max-client-batch-size": "max_client_batch_size",
    "--auto-truncate": "auto_truncate",
}
#: Flags that make the router print something and exit at once.
EXITING_FLAGS = frozenset({"-h", "--help", "-V", "--version"})

#: What a model id or a revision may consist of: an HF repo id
#: ("BAAI/bge-small-en-v1.5"), a branch, tag or commit ("refs/pr/2"), or a local
#: path made of ordinary characters ("/data/models/bge"). No whitespace, control
#: characters, quotes or shell syntax: argv items never reach a shell, but
#: nothing legitimate needs them, and they would only end up in logs and files.
SAFE_VALUE_PATTERN = r"[\w./@:+,=-]+\Z"
_SAFE_VALUE_CHARS = "letters, digits and . _ - / @ : + , ="
#: A long flag's name (before any "=value"): TEI's are lower-case words and dashes.
_LONG_FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*\Z")
#: A negative number given as a value ("-1", "-0.5", "-1e3"), not a short flag.
_NEGATIVE_NUMBER = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\Z")


@functools.cache
def _numeric_bounds(kind: type[msgspec.Struct]) -> tuple[tuple[str, Any], ...]:
    """The numeric fields of ``kind`` with their msgspec constraints."""
    bounds = []
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        kind_of = field.type
        options = kind_of.types if isinstance(kind_of, msgspec.inspect.UnionType) else (kind_of,)
        for option in options:
            if isinstance(option, msgspec.inspect.IntType | msgspec.inspect.FloatType):
                bounds.append((field.name, option))
    return tuple(bounds)


def check_bounds(struct: msgspec.Struct) -> None:
    """Raise `ValueError` naming the field unless every number of ``struct``
    is finite and within the bounds its type declares.

    The bounds are the fields' ``msgspec.Meta``, which decoding checks by
    itself; this applies the same ones to a Struct constructed in code, so
    both paths refuse the same values."""
    for name, bound in _numeric_bounds(type(struct)):
        value = getattr(struct, name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        for limit, ok, word in (
            (bound.ge, operator.ge, ">="),
            (bound.gt, operator.gt, ">"),
            (bound.le, operator.le, "<="),
            (bound.lt, operator.lt, "<"),
        ):
            if limit is not None and not ok(value, limit):
                shown = int(limit) if float(limit).is_integer() else limit
                raise ValueError(f"{name} must be {word} {shown}, got {value!r}")


class RestartBackoff(Backoff, frozen=True, forbid_unknown_fields=True):
    """An instance's backoff: the supervisor's `Backoff` with bounds a user
    can be held to. Each delay is at most a day, ``factor`` between 1 and 10,
    ``initial`` at most ``maximum``."""

    initial: Delay = 1.0
    factor: Annotated[float, msgspec.Meta(ge=1, le=MAX_FACTOR)] = 2.0
    maximum: Delay = 300.0
    reset_after: Annotated[float, msgspec.Meta(ge=0, le=MAX_WINDOW_SECONDS)] = 600.0

    def __post_init__(self) -> None:
        check_bounds(self)
        super().__post_init__()


class RestartPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How an instance is restarted after it exits or stops answering.

    Sized for processes that take seconds to minutes to load a model: up to
    ``max_restarts`` restarts within ``window_secs`` (default 5 in 10 minutes,
    the period OTP's guide recommends), each after a backoff that doubles from
    1 s to 5 minutes and resets after 10 healthy minutes (Kubernetes' rule).
    Past the limit the instance goes to ``failed`` until it is started again.
    """

    type: RestartType = RestartType.PERMANENT
    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=MAX_RESTARTS)] = 5
    window_secs: Annotated[float, msgspec.Meta(gt=0, le=MAX_WINDOW_SECONDS)] = 600.0
    #: A plain supervision `Backoff` given in code is held to the same bounds.
    backoff: RestartBackoff = RestartBackoff()

    def __post_init__(self) -> None:
        # Constructing the intensity validates the pair the same way decoding does.
        self.intensity  # noqa: B018
        check_bounds(self)
        given: Backoff = self.backoff
        if not isinstance(given, RestartBackoff):
            RestartBackoff(**msgspec.structs.asdict(given))  # checks the bounds

    @property
    def intensity(self) -> Intensity:
        return Intensity(max_restarts=self.max_restarts, period=self.window_secs)


class InstanceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One embedding-model instance, as created through the API or a config seed.

    ``port`` and ``prometheus_port`` are assigned from the configured ranges
    when omitted (tei-manager also accepts 0 for "assign one"). ``gpu_id``
    pins the instance to one GPU through ``CUDA_VISIBLE_DEVICES``; omitted, it
    sees every GPU. ``extra_args`` are appended to the router's command line
    after validation.
    """

    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    port: Port | None = None
    prometheus_port: Port | None = None
    gpu_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_ID)] | None = None
    max_batch_tokens: Tokens = 16384
    max_concurrent_requests: Requests = 512
    pooling: Pooling | None = None
    revision: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    dtype: Dtype | None = None
    max_client_batch_size: Requests | None = None
    auto_truncate: bool = False
    extra_args: list[str] = msgspec.field(default_factory=list)
    startup_timeout_secs: Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)] = 600.0
    stop_grace_secs: Delay = 30.0
    #: None: the manager's default restart policy.
    restart: RestartPolicy | None = None

    def __post_init__(self) -> None:
        # Meta constraints only run while decoding; construction in code is
        # checked here too, so both paths refuse the same values.
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r}: an instance name must be {NAME_RULE}")
        _check_model_id(self.model_id)
        if self.revision is not None:
            _check_revision(self.revision)
        check_bounds(self)
        check_extra_args(self.extra_args)


def _unsafe(text: str) -> bool:
    return any(ch in text for ch in "\0\n\r")


def _control(text: str) -> bool:
    """Whether ``text`` holds a control character (NUL, line breaks, tab,
    escape, DEL, ...) or a Unicode line or paragraph separator."""
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


def _check_model_id(model_id: str) -> None:
    if not model_id.strip():
        raise ValueError("model_id must not be empty")
    if len(model_id) > 1024:
        raise ValueError(f"model_id must be at most 1024 characters, got {len(model_id)}")
    if model_id.startswith("-"):
        raise ValueError(f"model_id {model_id!r} must not start with '-'")
    if _unsafe(model_id):
        raise ValueError("model_id must not contain NUL or line breaks")
    if not re.match(SAFE_VALUE_PATTERN, model_id):
        raise ValueError(
            f"model_id {model_id!r} is neither an HF repo id such as 'BAAI/bge-small-en-v1.5' "
            f"nor a local path such as '/data/models/bge': only {_SAFE_VALUE_CHARS} are allowed"
        )


def _check_revision(revision: str) -> None:
    if (
        len(revision) > 256
        or revision.startswith("-")
        or not re.match(SAFE_VALUE_PATTERN, revision)
    ):
        raise ValueError(
            f"revision {revision!r} is not a valid revision: a branch, tag or commit id "
            f"such as 'main' or 'refs/pr/2' ({_SAFE_VALUE_CHARS}; not starting with '-')"
        )


def _refuse_flag(flag: str, written: str | None = None) -> None:
    """Raise if ``flag`` (a router flag, ``--port`` or ``-p``) may not be in
    extra_args; ``written`` is the item's spelling when it is not ``flag``."""
    what = flag if written is None else f"{written} (read as {flag})"
    if flag in OWNED_FLAGS:
        raise ValueError(f"extra_args may not set {what}: the manager owns it")
    if flag in FIELD_FLAGS:
        raise ValueError(f"extra_args may not set {what}: use the field {FIELD_FLAGS[flag]!r}")
    if flag in EXITING_FLAGS:
        raise ValueError(f"extra_args may not contain {what}: the router would exit at once")


#: Long forms, the manager's own first: what an abbreviation is read as.
_PROTECTED_LONG = [
    flag
    for group in (OWNED_FLAGS, FIELD_FLAGS, EXITING_FLAGS)
    for flag in sorted(group)
    if flag.startswith("--")
]
_PROTECTED_SHORT = {flag[1]: flag for flag in (*OWNED_FLAGS, *EXITING_FLAGS) if len(flag) == 2}


def _check_long_flag(arg: str) -> None:
    written = arg.split("=", 1)[0]
    if not _LONG_FLAG.match(written):
        raise ValueError(
            f"extra_args item {arg!r} is not a flag: write '--flag' or '--flag=value', "
            "and give a value as an item of its own"
        )
    # Compared as a lenient parser might read it: any case, '_' for '-'.
    flag = written.lower().replace("_", "-")
    _refuse_flag(flag, None if flag == written else written)
    # Neither TEI (clap) nor the embedded backend (argparse, allow_abbrev=False)
    # expands an abbreviation, but a parser that did would read "--host" as
    # "--hostname": refused too. No real router flag is a prefix of these.
    for full in _PROTECTED_LONG:
        if full.startswith(flag):
            _refuse_flag(full, written)


def _check_short_flag(arg: str) -> None:
    # A short flag alone ("-p"), with its value attached ("-p8080", "-p=8080"),
    # or inside a cluster ("-xp8080"). The router's only short flags are -p, -h
    # and -V, so one of those anywhere in the cluster's letters is refused.
    _refuse_flag(arg[:2])
    for letter in itertools.takewhile(str.isalpha, arg[1:]):
        if letter in _PROTECTED_SHORT:
            _refuse_flag(_PROTECTED_SHORT[letter], arg)


def check_extra_args(extra_args: Sequence[str]) -> None:
    """Raise `ValueError` unless ``extra_args`` may follow the manager's flags.

    Each item is one argv item, never split or given to a shell; refused are
    control characters and anything that would set a flag the manager owns,
    a flag with a field of its own, or a flag that makes the router exit."""
    for arg in extra_args:
        if not isinstance(arg, str) or _control(arg):
            raise ValueError(
                f"extra_args item {arg!r} must be a string without NUL, line breaks "
                "or other control characters"
            )
        if arg == "--":
            raise ValueError("extra_args may not contain '--': it would end the router's options")
        if arg.startswith("--"):
            _check_long_flag(arg)
        elif arg.startswith("-") and len(arg) > 1 and not _NEGATIVE_NUMBER.match(arg):
            _check_short_flag(arg)
    if extra_args and not extra_args[0].startswith("-"):
        raise ValueError(
            f"extra_args must start with a flag (got {extra_args[0]!r}); "
            "values follow their flag, e.g. ['--dtype', 'float16']"
        )


def spec_from_dict(data: object) -> InstanceSpec:
    """Decode a parsed JSON/TOML object into a validated spec.

    Raises `msgspec.ValidationError` whose message names the offending field,
    e.g. ``Expected `int` >= 1 - at `$.port```.
    """
    try:
        return msgspec.convert(data, InstanceSpec, strict=True)
    except msgspec.ValidationError as exc:
        worded = worded_error(str(exc))
        if worded == str(exc):
            raise
        raise msgspec.ValidationError(worded) from None
