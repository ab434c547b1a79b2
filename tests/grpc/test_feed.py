"""The routing view and the feed to the multiplexer's workers (pure)."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest

from teisup.grpc import (
    VIEW_VERSION,
    FeedError,
    FrameDecoder,
    Reload,
    RequestBatch,
    RequestRecord,
    RoutingView,
    ViewInstance,
    ViewSource,
    WorkerFailed,
    WorkerReady,
    WorkerSetup,
    encode_message,
    routing_view,
    worker_share,
)
from teisup.security import TlsSettings
from teisup.supervision import ChildState


def instance(name: str, status: ChildState = ChildState.RUNNING, limit: int = 512) -> ViewInstance:
    return ViewInstance(
        name=name, model_id="m", status=status, port=8080, max_concurrent_requests=limit
    )


def test_every_message_survives_the_frame_however_the_bytes_are_cut() -> None:
    messages = [
        WorkerSetup(
            index=1,
            workers=2,
            host="127.0.0.1",
            port=9001,
            max_message_length=1 << 20,
            default_timeout=30.0,
            stream_idle_timeout=300.0,
            queue_timeout=1.0,
            tls=TlsSettings(cert="c.pem", key="k.pem"),
            api_token="secret",
        ),
        RoutingView(seq=3, instances=(instance("a"), instance("b", ChildState.STOPPED))),
        Reload(),
        WorkerReady(9001, 1234),
        WorkerFailed("Address already in use", 98),
        RequestBatch.of([RequestRecord("grpc", "Embed", "a", "OK", 0.001, None)], {"a": 2}),
    ]
    stream = b"".join(encode_message(m) for m in messages)
    for cut in (1, 3, 7, len(stream)):
        decoder = FrameDecoder()
        got = []
        for at in range(0, len(stream), cut):
            got.extend(decoder.feed(stream[at : at + cut]))
        assert got == messages


def test_a_batch_gives_back_its_records() -> None:
    records = [
        RequestRecord("grpc", "EmbedArrow", "", "OK", 0.5, 3),
        RequestRecord("grpc", "Info", "a", "UNAVAILABLE", 0.25, None),
    ]
    assert RequestBatch.of(records).unpack() == records


def test_a_bad_frame_is_an_error_not_a_guess() -> None:
    with pytest.raises(FeedError, match="not a message"):
        FrameDecoder().feed(len(b"junk").to_bytes(4, "big") + b"junk")
    with pytest.raises(FeedError, match="over the limit"):
        FrameDecoder().feed((1 << 31).to_bytes(4, "big"))


def test_the_view_is_built_from_the_managers_records() -> None:
    record = SimpleNamespace(
        name="a",
        model_id="BAAI/bge-small-en-v1.5",
        status=ChildState.BACKOFF,
        port=8081,
        pid=42,
        spec=SimpleNamespace(max_concurrent_requests=64),
    )
    view = routing_view([record], 7)
    assert view.version == VIEW_VERSION
    assert view.seq == 7
    [only] = view.instances
    assert (only.name, only.model_id, only.status, only.port, only.pid) == (
        "a",
        "BAAI/bge-small-en-v1.5",
        ChildState.BACKOFF,
        8081,
        42,
    )
    assert only.spec.max_concurrent_requests == 64
    assert only.node == ""


def test_a_reader_skips_fields_a_later_view_adds() -> None:
    later = {
        "type": "view",
        "seq": 1,
        "version": 2,
        "instances": [
            {
                "name": "a",
                "model_id": "m",
                "status": "running",
                "port": 1,
                "max_concurrent_requests": 4,
                "node": "gpu-2",
                "warm": False,
            }
        ],
    }
    body = msgspec.msgpack.encode(later)
    [view] = FrameDecoder().feed(len(body).to_bytes(4, "big") + body)
    assert isinstance(view, RoutingView)
    assert view.instances[0].node == "gpu-2"


def test_each_worker_holds_its_share_of_an_instances_limit() -> None:
    assert worker_share(512, 1) == 512
    assert worker_share(512, 2) == 256
    assert worker_share(10, 3) == 3  # 9 in all: never more than the instance takes
    assert worker_share(1, 4) == 1  # but each worker may send one
    source = ViewSource(workers=4)
    assert source.update(RoutingView(seq=1, instances=(instance("a", limit=100),)))
    [a] = source.all()
    assert a.spec.max_concurrent_requests == 25


def test_an_older_view_never_replaces_a_newer_one() -> None:
    source = ViewSource()
    assert source.update(RoutingView(seq=5, instances=(instance("a", ChildState.STOPPED),)))
    assert not source.update(RoutingView(seq=4, instances=(instance("a"),)))
    assert [i.status for i in source.all()] == [ChildState.STOPPED]
    assert source.update(RoutingView(seq=6, instances=()))
    assert source.all() == []
