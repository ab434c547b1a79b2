"""What a user asks for: an instance's spec, validated, and its restart policy.

These Structs are the REST API's request bodies and the state file's records,
so every bad value is refused here with a message that names the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from ..supervision import Backoff, Intensity, RestartType

__all__ = ["InstanceSpec", "RestartPolicy", "spec_from_dict"]

# \Z, not $: "$" also matches before a final newline.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}\Z"

Pooling = Literal["cls", "mean", "splade", "last-token"]
Dtype = Literal["float16", "float32", "bfloat16"]
#: 0 means "assign one", as in tei-manager.
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(gt=0)]

#: A day: longer start-up or stop budgets are a mistake, not a setting.
MAX_SECONDS = 86400.0

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


class RestartPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How an instance is restarted after it exits or stops answering.

    Sized for processes that take seconds to minutes to load a model: up to
    ``max_restarts`` restarts within ``window_secs`` (default 5 in 10 minutes,
    the period OTP's guide recommends), each after a backoff that doubles from
    1 s to 5 minutes and resets after 10 healthy minutes (Kubernetes' rule).
    Past the limit the instance goes to ``failed`` until it is started again.
    """

    type: RestartType = RestartType.PERMANENT
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    window_secs: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    backoff: Backoff = Backoff(initial=1.0, factor=2.0, maximum=300.0, reset_after=600.0)

    def __post_init__(self) -> None:
        # Constructing the intensity validates the pair the same way decoding does.
        self.intensity  # noqa: B018

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
    gpu_id: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_batch_tokens: Positive = 16384
    max_concurrent_requests: Positive = 512
    pooling: Pooling | None = None
    revision: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    dtype: Dtype | None = None
    max_client_batch_size: Positive | None = None
    auto_truncate: bool = False
    extra_args: list[str] = msgspec.field(default_factory=list)
    startup_timeout_secs: Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)] = 600.0
    stop_grace_secs: Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)] = 30.0
    #: None: the manager's default restart policy.
    restart: RestartPolicy | None = None

    def __post_init__(self) -> None:
        # Meta constraints only run while decoding; construction in code is
        # checked here too, so both paths refuse the same values.
        if not re.match(NAME_PATTERN, self.name):
            raise ValueError(
                f"name {self.name!r} must match {NAME_PATTERN} (lower-case letters, digits, "
                "'.', '_', '-'; at most 63 characters)"
            )
        _check_model_id(self.model_id)
        if self.revision is not None and (self.revision.startswith("-") or _unsafe(self.revision)):
            raise ValueError(f"revision {self.revision!r} is not a valid revision")
        for field in ("port", "prometheus_port"):
            value = getattr(self, field)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{field} must be between 1 and 65535 (0: assign), got {value}")
        if self.gpu_id is not None and self.gpu_id < 0:
            raise ValueError(f"gpu_id must be >= 0, got {self.gpu_id}")
        for field in ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"{field} must be > 0, got {value}")
        _check_extra_args(self.extra_args)
        for field, low in (("startup_timeout_secs", 0.0), ("stop_grace_secs", -1.0)):
            value = getattr(self, field)
            if not (low < value <= MAX_SECONDS):  # also refuses NaN
                raise ValueError(
                    f"{field} must be {'> 0' if low == 0 else '>= 0'} and at most "
                    f"{MAX_SECONDS:g} seconds, got {value!r}"
                )


def _unsafe(text: str) -> bool:
    return any(ch in text for ch in "\0\n\r")


def _check_model_id(model_id: str) -> None:
    if not model_id.strip():
        raise ValueError("model_id must not be empty")
    if model_id.startswith("-"):
        raise ValueError(f"model_id {model_id!r} must not start with '-'")
    if _unsafe(model_id):
        raise ValueError("model_id must not contain NUL or line breaks")


def _check_extra_args(extra_args: list[str]) -> None:
    for arg in extra_args:
        if not isinstance(arg, str) or _unsafe(arg):
            raise ValueError(f"extra_args item {arg!r} must be a string without NUL or line breaks")
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
        elif arg.startswith("-") and len(arg) > 2:
            flag = arg[:2]  # "-p8080", "-p=8080": a short flag with its value attached
        else:
            flag = arg
        if flag in OWNED_FLAGS:
            raise ValueError(f"extra_args may not set {flag}: the manager owns it")
        if flag in FIELD_FLAGS:
            raise ValueError(f"extra_args may not set {flag}: use the field {FIELD_FLAGS[flag]!r}")
        if flag in EXITING_FLAGS:
            raise ValueError(f"extra_args may not contain {flag}: the router would exit at once")
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
    return msgspec.convert(data, InstanceSpec, strict=True)
