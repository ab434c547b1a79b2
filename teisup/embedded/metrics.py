"""TEI's ``te_*`` Prometheus metrics and the exporter on ``--prometheus-port``.

The text matches metrics-exporter-prometheus 0.15 (what TEI 1.8.3 uses): a
``# TYPE`` line per metric, no HELP lines, no ``_total`` suffix on counters,
histograms as ``_bucket``/``_sum``/``_count``, and a metric appears only once
it has been used. The exporter answers ``GET /health`` with ``OK`` and any
other path with the metrics, like TEI's gRPC build. prometheus_client is not
used because it renames counters (``_total``) and adds ``_created`` series.

All methods are synchronous and meant for the Trio thread.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import trio

__all__ = ["DURATION_BUCKETS", "Metrics", "serve_metrics"]

DURATION_BUCKETS: tuple[float, ...] = tuple(1e-5 * 1.5**i for i in range(35))
"""TEI's buckets for every ``*_duration`` histogram (seconds): 1e-5, x1.5, 35 of them."""

BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(13))  # 1..4096
BATCH_TOKENS_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(21))  # 1..2^20

Labels = tuple[tuple[str, str], ...]


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = [*labels, extra] if extra else list(labels)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


class Metrics:
    """The registry: counters, gauges and histograms by name and label set."""

    def __init__(self, *, input_length_buckets: Sequence[float] = ()) -> None:
        self._counters: dict[str, dict[Labels, float]] = {}
        self._gauges: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, _Histogram]] = {}
        self._buckets: dict[str, Sequence[float]] = {
            "te_batch_next_size": BATCH_SIZE_BUCKETS,
            "te_batch_next_tokens": BATCH_TOKENS_BUCKETS,
            "te_request_input_length": input_length_buckets or BATCH_TOKENS_BUCKETS,
        }

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to the counter ``name``."""
        series = self._counters.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set the gauge ``name``."""
        self._gauges.setdefault(name, {})[tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record ``value`` in the histogram ``name`` (durations in seconds)."""
        series = self._histograms.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        if key not in series:
            series[key] = _Histogram(self._buckets.get(name, DURATION_BUCKETS))
        series[key].observe(value)

    def counter(self, name: str, **labels: str) -> float:
        """The current value of a counter (0 if never used), for tests and reports."""
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """The Prometheus text exposition of everything recorded so far."""
        lines: list[str] = []
        for kind, table in (("counter", self._counters), ("gauge", self._gauges)):
            for name in sorted(table):
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(table[name].items()):
                    lines.append(f"{name}{_labels(labels)} {_fmt(value)}")
                lines.append("")
        for name in sorted(self._histograms):
            lines.append(f"# TYPE {name} histogram")
            for labels, hist in sorted(self._histograms[name].items(), key=lambda kv: kv[0]):
                running = 0
                for bound, count in zip(hist.bounds, hist.counts, strict=True):
                    running += count
                    lines.append(f"{name}_bucket{_labels(labels, ('le', _fmt(bound)))} {running}")
                lines.append(f"{name}_bucket{_labels(labels, ('le', '+Inf'))} {hist.count}")
                lines.append(f"{name}_sum{_labels(labels)} {_fmt(hist.sum)}")
                lines.append(f"{name}_count{_labels(labels)} {hist.count}")
            lines.append("")
        return "\n".join(lines) + ("\n" if lines else "")


_MAX_REQUEST_HEAD = 16384


async def _answer(stream: trio.abc.Stream, metrics: Metrics) -> None:
    try:
        head = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in head and len(head) < _MAX_REQUEST_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
        if path == "/health":
            body, content_type = b"OK", "text/plain; charset=utf-8"
        else:
            body, content_type = metrics.render().encode(), "text/plain; version=0.0.4"
        status = "200 OK" if len(parts) >= 2 else "400 Bad Request"
        response = (
            f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode() + body
        await stream.send_all(response)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the scraper went away; nothing to tell it
    finally:
        await stream.aclose()


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``metrics`` over HTTP/1.1 on ``host:port`` until cancelled.

    One request per connection (``connection: close``), which is all a
    Prometheus scraper or a ``curl`` needs. Raises OSError before
    ``task_status.started`` if the port cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        bound = listeners[0].socket.getsockname()[1]
        task_status.started(bound)

        async def handler(stream: trio.SocketStream) -> None:
            await _answer(stream, metrics)

        await trio.serve_listeners(handler, listeners)
    finally:
        for listener in listeners:
            await listener.aclose()
