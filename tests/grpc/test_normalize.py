"""``normalize`` as TEI 1.9.3 answers it, end to end: unset, false and true.

A grpcio client compiled by grpcio-tools from protos/ (tei-manager 0.12's
protos, field for field: tests/test_protos.py) calls the multiplexer, and
httpx calls the HTTP data plane (``/instances/{name}/embed``,
``/v1/embeddings``) served by hypercorn over the same `MultiplexerService`:

* against the embedded backend with the real model, unset and true give unit
  vectors and false the raw pooled vector (|v| about 5.7 for MiniLM);
* against the recording stand-in (``tests/fake_tei.py`` with
  ``FAKE_TEI_RECORD``), what reaches the instance is what the client sent:
  an explicit false arrives as false, unset arrives unset.

The Arrow path (``EmbedArrow``) has a plain bool: its value always arrives
set (``teisup.grpc.arrow``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import hypercorn.config
import hypercorn.trio
import numpy as np
import pyarrow as pa
import pytest
import trio
from quart_trio import QuartTrio

from teisup.api.dataplane import add_data_plane
from teisup.grpc import Multiplexer

from ..embedded.conftest import MINILM, needs_minilm
from .conftest import Backend, Instances, running_mux

TEXT = "Supervisors restart what crashes."

#: The three ways a client can state ``normalize``: not at all, false, true.
CHOICES: tuple[bool | None, ...] = (None, False, True)


@asynccontextmanager
async def data_plane(instances: Instances) -> AsyncIterator[tuple[Multiplexer, str]]:
    """The multiplexer and the HTTP data plane over one `MultiplexerService`."""
    async with running_mux(instances) as mux:
        app = QuartTrio("normalize-test")
        add_data_plane(app, mux.service, max_body=1 << 20)
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                functools.partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait)
            )
            yield mux, binds[0]
            stop.set()


def grpcio_calls(port: int, stubs: SimpleNamespace, name: str) -> dict[str, list[list[float]]]:
    """Embed, EmbedStream and EmbedArrow with each choice, by grpcio (blocking)."""
    pb2, tei = stubs.pb2, stubs.tei_pb2
    target = pb2.Target(instance_name=name)

    def tei_request(choice: bool | None) -> Any:
        # None: the field is left out, as a client that relies on the default does.
        return tei.EmbedRequest(inputs=TEXT, **({} if choice is None else {"normalize": choice}))

    got: dict[str, list[list[float]]] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = stubs.pb2_grpc.TeiMultiplexerStub(channel)
        got["Embed"] = [
            list(stub.Embed(pb2.EmbedRequest(target=target, request=tei_request(c))).embeddings)
            for c in CHOICES
        ]
        requests = [pb2.EmbedRequest(target=target, request=tei_request(c)) for c in CHOICES]
        got["EmbedStream"] = [list(a.embeddings) for a in stub.EmbedStream(iter(requests))]
        sink = pa.BufferOutputStream()
        table = pa.table({"text": pa.array([TEXT], pa.string())})
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        arrow_rows = []
        for normalize in (False, True):
            answer = stub.EmbedArrow(
                pb2.EmbedArrowRequest(
                    target=target, arrow_ipc=sink.getvalue().to_pybytes(), normalize=normalize
                )
            )
            column = pa.ipc.open_stream(answer.arrow_ipc).read_all().column("embeddings")
            arrow_rows.append(column.to_pylist()[0])
        got["EmbedArrow"] = arrow_rows
    return got


async def http_calls(url: str, name: str, model: str) -> dict[str, list[list[float]]]:
    """``/instances/{name}/embed`` with each choice, and ``/v1/embeddings``."""
    got: dict[str, list[list[float]]] = {"embed": []}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for choice in CHOICES:
            body: dict[str, Any] = {"inputs": TEXT}
            if choice is not None:
                body["normalize"] = choice
            response = await http.post(f"/instances/{name}/embed", json=body)
            assert response.status_code == 200, response.text
            (row,) = response.json()
            got["embed"].append(row)
        explicit_null = await http.post(
            f"/instances/{name}/embed", json={"inputs": TEXT, "normalize": None}
        )
        assert explicit_null.status_code == 200, explicit_null.text
        got["embed_null"] = explicit_null.json()
        openai = await http.post("/v1/embeddings", json={"input": [TEXT], "model": model})
        assert openai.status_code == 200, openai.text
        got["v1"] = [row["embedding"] for row in openai.json()["data"]]
    return got


def norms(rows: list[list[float]]) -> list[float]:
    return [round(float(np.linalg.norm(row)), 4) for row in rows]


@pytest.mark.slow
@needs_minilm
async def test_tei_193_answers_through_the_multiplexer_and_http(
    minilm_backend: Backend, mux_stubs: SimpleNamespace
) -> None:
    instances = Instances(minilm_backend.record("minilm", model_id=MINILM))
    async with data_plane(instances) as (mux, url):
        grpc_got = await trio.to_thread.run_sync(grpcio_calls, mux.port, mux_stubs, "minilm")
        http_got = await http_calls(url, "minilm", MINILM)

    raw = grpc_got["Embed"][1]
    raw_norm = float(np.linalg.norm(raw))
    assert raw_norm > 2  # MiniLM's mean-pooled vectors are far from unit length
    unit = (np.asarray(raw) / raw_norm).tolist()
    # unset and true: normalized (|v| = 1); false: the raw pooled vector.
    for rows in (grpc_got["Embed"], grpc_got["EmbedStream"], http_got["embed"]):
        assert norms(rows) == [1.0, round(raw_norm, 4), 1.0]
        assert rows[0] == pytest.approx(unit, abs=1e-5)
        assert rows[1] == pytest.approx(raw, abs=1e-5)
    assert norms(http_got["embed_null"]) == [1.0]
    assert norms(http_got["v1"]) == [1.0]  # /v1/embeddings always normalizes, as TEI's
    assert norms(grpc_got["EmbedArrow"]) == [round(raw_norm, 4), 1.0]
    assert grpc_got["EmbedArrow"][0] == pytest.approx(raw, abs=1e-5)


async def test_the_instance_receives_what_the_client_sent(
    fake_backend: Callable[..., Backend], mux_stubs: SimpleNamespace, tmp_path: Path
) -> None:
    record = tmp_path / "received.jsonl"
    backend = fake_backend("test/recorder", env={"FAKE_TEI_RECORD": str(record)})
    instances = Instances(backend.record("recorder", model_id="test/recorder"))
    async with data_plane(instances) as (mux, url):
        grpc_got = await trio.to_thread.run_sync(grpcio_calls, mux.port, mux_stubs, "recorder")
        grpc_received = [json.loads(line)["normalize"] for line in record.read_text().splitlines()]
        record.unlink()
        http_got = await http_calls(url, "recorder", "test/recorder")
        http_received = [json.loads(line)["normalize"] for line in record.read_text().splitlines()]

    # Embed x3, EmbedStream x3, then one EmbedArrow row each with false and true.
    assert grpc_received == [None, False, True, None, False, True, False, True]
    # /embed x3, /embed with "normalize": null, then /v1/embeddings (always true).
    assert http_received == [None, False, True, None, True]
    # The stand-in answers as TEI 1.9 does: unset means true.
    unit, raw = [0.6, 0.8], [3.0, 4.0]
    for rows in (grpc_got["Embed"], grpc_got["EmbedStream"], http_got["embed"]):
        assert rows == [pytest.approx(unit), raw, pytest.approx(unit)]
    assert grpc_got["EmbedArrow"] == [raw, pytest.approx(unit)]
    assert http_got["v1"] == [pytest.approx(unit)]
