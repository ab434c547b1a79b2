"""What an instance says while it starts, and what it dies of: pure readers of its lines.

`classify` maps one line of TEI's (or the embedded backend's) output to the
start-up `Phase` it announces, from a table of TEI's own messages; a
download's percentage comes from the progress bars that HuggingFace tools
print. `summarize_error` picks, from the last lines of a process that exited,
the one line that says what went wrong, and whether the process itself says
retrying cannot help (`Summary.permanent`).

Both read the message of a TEI JSON line and the text of any other; neither
does I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

import msgspec

__all__ = [
    "PERMANENT_MARKERS",
    "Phase",
    "PhaseLine",
    "Summary",
    "classify",
    "summarize_error",
]


class Phase(enum.Enum):
    """Where a run of an instance is on its way to serving, in order."""

    #: The process was started; it has said nothing we recognise yet.
    SPAWNED = "spawned"
    #: Fetching the model's files (``progress`` says how far, when known).
    DOWNLOADING = "downloading"
    #: Reading the weights and creating the backend.
    LOADING = "loading"
    #: The warm-up forward pass.
    WARMING_UP = "warming_up"
    #: Ready: its health check answered.
    READY = "ready"


class PhaseLine(msgspec.Struct, frozen=True):
    """What one output line says about the start-up."""

    phase: Phase
    #: Percent of a download, when the line shows one.
    progress: float | None = None


# TEI's text layout: timestamp, level, then "span: ", "target: " and
# "file:line: " prefixes (each one token ending in a colon), then the message.
_TEI_TEXT = re.compile(r"^\S+Z\s+[A-Z]+\s+(?:\S+:\s+)*?(?:\S+\.rs:\d+:\s+)(?P<message>.*)$")
# A HuggingFace / tqdm progress bar: "model.safetensors:  45%|████▌     | 41.0M/90.9M".
_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)%\|")

#: (message pattern, phase), first match wins: TEI 1.8/1.9's start-up lines
#: (router, core download, backends) and the embedded backend's.
_TABLE: tuple[tuple[re.Pattern[str], Phase], ...] = tuple(
    (re.compile(pattern), phase)
    for pattern, phase in (
        (r"^Starting download", Phase.DOWNLOADING),
        (r"^Downloading `", Phase.DOWNLOADING),
        (r"^Model (artifacts|weights) downloaded in", Phase.LOADING),
        (r"^Starting model backend", Phase.LOADING),
        (r"^Model \S+ found at ", Phase.LOADING),  # the embedded backend's resolution
        (r"^Starting \w+ model on ", Phase.LOADING),  # "Starting FlashBert model on Cuda(...)"
        (r"^Warming up model", Phase.WARMING_UP),
    )
)


def message_of(text: str, message: str | None = None) -> str:
    """The message part of a line: a JSON line's ``message``, or TEI's text after its prefixes."""
    if message is not None:
        return message.strip()
    match = _TEI_TEXT.match(text.strip())
    return (match.group("message") if match else text).strip()


def classify(text: str, message: str | None = None) -> PhaseLine | None:
    """The phase one line announces (``message``: a TEI JSON line's), or None."""
    said = message_of(text, message)
    if said == "Ready":
        return PhaseLine(Phase.READY)
    percent = _PERCENT.findall(said)
    if percent:
        return PhaseLine(Phase.DOWNLOADING, min(float(percent[-1]), 100.0))
    for pattern, phase in _TABLE:
        if pattern.match(said):
            return PhaseLine(phase)
    return None


#: Words by which a process says that running it again cannot help: a model
#: that is not on the machine (offline), an unknown or bad flag (clap's and
#: argparse's usage errors).
PERMANENT_MARKERS = (
    "not available offline",
    "unexpected argument",
    "unrecognized arguments",
    "invalid value",
    "the following arguments are required",
)


class Summary(msgspec.Struct, frozen=True):
    """The line that says why a process ended, and whether it says that is for good."""

    text: str
    permanent: bool = False


def _clean_cause(line: str) -> str:
    text = line.strip()
    # anyhow numbers a chain of more than one cause: "0: ...", "1: ...".
    text = re.sub(r"^\d+:\s+", "", text)
    # A clause that announces a list ("...; looked in:") only leads to lines
    # that the logs keep in full.
    head, sep, tail = text.rpartition("; ")
    if sep and tail.endswith(":"):
        text = head
    return text.rstrip(":").strip()


def summarize_error(lines: Sequence[str], *, status: int | None = None) -> Summary | None:
    """The error a process's last ``lines`` (messages, oldest first) end with, or None.

    In order of preference: the deepest cause of the last anyhow ``Error:``
    (TEI's ``main``; "not available offline" rather than "Could not download
    model artifacts"), a usage error (``error: ...``, exit status 2), a
    panic's message, a Python traceback's last line, and else the last line
    that is not TEI's ``Args { ... }`` dump. ``status`` 2 (clap's usage
    error) is permanent too.
    """
    texts = [line.rstrip() for line in lines]
    summary = _anyhow(texts) or _usage(texts) or _panic(texts) or _traceback(texts)
    if summary is None:
        rest = [t.strip() for t in texts if t.strip() and not t.strip().startswith("Args {")]
        if not rest:
            return None
        summary = rest[-1]
    summary = summary if len(summary) <= 300 else summary[:297] + "..."
    said = " ".join(texts)
    permanent = status == 2 or any(marker in said for marker in PERMANENT_MARKERS)
    return Summary(summary, permanent)


def _anyhow(texts: list[str]) -> str | None:
    starts = [i for i, t in enumerate(texts) if t.startswith("Error: ")]
    if not starts:
        return None
    first = starts[-1]
    context = texts[first].removeprefix("Error: ").strip()
    causes: list[str] = []
    in_chain = False
    for text in texts[first + 1 :]:
        if text.strip() == "Caused by:":
            in_chain = True
        elif in_chain and re.match(r"^\s{4}(\d+:\s+)?\S", text):
            if re.match(r"^\s{4}\d+:\s+", text) or not causes:
                causes.append(_clean_cause(text))
        elif in_chain and text.strip() and not text.startswith(" "):
            break
    return causes[-1] if causes else context


def _usage(texts: list[str]) -> str | None:
    for text in reversed(texts):
        low = text.strip()
        if low.startswith("error: "):
            return low.removeprefix("error: ").strip()
        match = re.match(r"^\S+: error: (.*)$", low)  # argparse: "prog: error: ..."
        if match:
            return match.group(1).strip()
    return None


def _panic(texts: list[str]) -> str | None:
    for i in range(len(texts) - 1, -1, -1):
        if "panicked at" in texts[i]:
            after = texts[i].split("panicked at", 1)[1]
            # Rust >= 1.73 puts the message on the next line; older ones after a ':'.
            if i + 1 < len(texts) and texts[i + 1].strip() and after.rstrip().endswith(":"):
                return texts[i + 1].strip()
            return texts[i].strip()
    return None


def _traceback(texts: list[str]) -> str | None:
    starts = [i for i, t in enumerate(texts) if t.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    tail = [t for t in texts[starts[-1] + 1 :] if t.strip() and not t.startswith(" ")]
    return tail[-1].strip() if tail else None
