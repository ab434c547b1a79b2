"""The data plane end to end: a real ``teisup`` with embedded-backend instances (real model).

HTTP (TEI's JSON routes and OpenAI's embeddings) and gRPC (grpcio) clients
against the manager, compared with calls straight to the instance.
"""

from __future__ import annotations

import base64
import os
import re
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio

from teisup.proto.tei.v1 import tei_grpc, tei_pb2
from teisup.rpc import Channel, call_once

from ..embedded.conftest import MINILM, needs_minilm
from .test_service_e2e import status_of_announced_body, teisup, wait_state

pytestmark = [pytest.mark.slow, needs_minilm]

TOKEN = "data-plane-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["The cat sat on the mat.", "Embeddings map text to vectors.", "Trio is nice."]


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No TEI binary: instances run on the embedded backend."""
    return {"TEI_BINARY_PATH": "", "PATH": os.defpath, **extra}


async def direct_embed(port: int, text: str) -> list[float]:
    async def call(channel: Channel) -> Any:
        request = tei_pb2.EmbedRequest(inputs=text, normalize=True)
        return await tei_grpc.EmbedStub(channel).Embed(request)

    return list((await call_once("127.0.0.1", port, call, timeout=60)).embeddings)


async def direct_tokenize(port: int, text: str) -> Any:
    async def call(channel: Channel) -> Any:
        request = tei_pb2.EncodeRequest(inputs=text, add_special_tokens=True)
        return await tei_grpc.TokenizeStub(channel).Tokenize(request)

    return await call_once("127.0.0.1", port, call, timeout=60)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample whose labels include ``labels``."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


async def test_tei_http_routes_and_openai_embeddings(tmp_path: Path) -> None:
    env = embedded_env(tmp_path, TEISUP_API_TOKEN=TOKEN)
    config = "grpc_max_message_size_mb = 1\n"
    async with teisup(tmp_path, config, env=env, client={"headers": AUTH}) as t:
        info = await wait_state(t, "minilm", "running")
        port = info["port"]
        assert isinstance(port, int)
        http = t.http

        # The data plane is behind the token too.
        async with httpx.AsyncClient(base_url=t.url) as anonymous:
            refused = await anonymous.post("/instances/minilm/embed", json={"inputs": "hi"})
            assert refused.status_code == 401
            assert (await anonymous.post("/v1/embeddings", json={"input": "x"})).status_code == 401

        # /embed: one row per input, equal to the instance's own answer.
        one = await http.post("/instances/minilm/embed", json={"inputs": TEXTS[0]})
        assert one.status_code == 200, one.text
        assert one.json() == [await direct_embed(port, TEXTS[0])]
        batch = await http.post("/instances/minilm/embed", json={"inputs": TEXTS})
        assert batch.status_code == 200, batch.text
        # Batched forward passes pad, so the last bits may differ from one-by-one.
        for row, text in zip(batch.json(), TEXTS, strict=True):
            assert row == pytest.approx(await direct_embed(port, text), abs=1e-5)

        # /tokenize: TEI's token objects, special tokens without offsets.
        tokens = await http.post("/instances/minilm/tokenize", json={"inputs": [TEXTS[0]]})
        assert tokens.status_code == 200, tokens.text
        expected = await direct_tokenize(port, TEXTS[0])
        got = tokens.json()[0]
        assert [t["id"] for t in got] == [t.id for t in expected.tokens]
        assert (got[0]["special"], got[0]["start"]) == (True, None)
        assert (got[1]["special"], got[1]["start"]) == (False, 0)

        # A dense model has no sparse output and is no reranker: TEI's 424 Backend.
        sparse = await http.post("/instances/minilm/embed_sparse", json={"inputs": "x"})
        rerank = await http.post(
            "/instances/minilm/rerank", json={"query": "q", "texts": ["a", "b"]}
        )
        for refused in (sparse, rerank):
            assert refused.status_code == 424, refused.text
            assert refused.json()["error_type"] == "Backend"

        # Bad requests: each a clear status and TEI's error fields.
        cases = [
            ("/instances/nope/embed", {"inputs": "x"}, 404, "NotFound"),
            ("/instances/minilm/embed", {"inputs": []}, 400, "Empty"),
            ("/instances/minilm/embed", {"inputs": [101, 2023]}, 422, "Validation"),
            ("/instances/minilm/embed", {"inputs": "x", "dimensions": 0}, 422, "Validation"),
            ("/instances/minilm/embed", {"text": "x"}, 422, "Validation"),
            ("/instances/minilm/rerank", {"query": "q", "texts": []}, 400, "Empty"),
        ]
        for path, body, status, error_type in cases:
            response = await http.post(path, json=body)
            assert response.status_code == status, (path, body, response.text)
            assert response.json()["error_type"] == error_type
            assert response.json()["error"]
        malformed = await http.post(
            "/instances/minilm/embed",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert malformed.status_code == 400
        status = await status_of_announced_body(
            t.url, "/instances/minilm/embed", 2 << 20, headers=AUTH
        )
        assert status == 413

        # OpenAI: model is an instance name or a model id; float or base64.
        empty = await http.post("/v1/embeddings", json={"input": [], "model": "minilm"})
        assert empty.status_code == 400
        assert "`input` cannot be empty" in empty.text  # OpenAI's field, not TEI's `inputs`
        by_name = await http.post("/v1/embeddings", json={"input": TEXTS, "model": "minilm"})
        assert by_name.status_code == 200, by_name.text
        body = by_name.json()
        assert (body["object"], body["model"]) == ("list", "minilm")
        assert [row["index"] for row in body["data"]] == [0, 1, 2]
        expected_row = await direct_embed(port, TEXTS[1])
        assert body["data"][1]["embedding"] == pytest.approx(expected_row, abs=1e-5)
        assert body["usage"]["prompt_tokens"] > len(TEXTS)
        by_model = await http.post(
            "/v1/embeddings",
            json={"input": TEXTS[1], "model": MINILM, "encoding_format": "base64"},
        )
        assert by_model.status_code == 200, by_model.text
        raw = base64.b64decode(by_model.json()["data"][0]["embedding"])
        vector = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert vector == pytest.approx(body["data"][1]["embedding"], abs=1e-6)
        unknown = await http.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"})
        assert unknown.status_code == 404
        assert "gpt-4" in unknown.json()["error"]["message"]

        # Every request above was counted, by transport, method, instance and code.
        scrape = (await http.get("/metrics")).text
        assert metric(scrape, "teisup_requests_total", method="embed", code="OK") == 2
        assert (
            metric(
                scrape, "teisup_requests_total", transport="http", method="embed", code="NOT_FOUND"
            )
            == 1
        )
        assert metric(scrape, "teisup_requests_total", method="openai_embeddings", code="OK") == 2
        assert (
            metric(scrape, "teisup_requests_total", method="embed", code="RESOURCE_EXHAUSTED") == 1
        )
        assert metric(scrape, "teisup_request_duration_seconds_count", method="embed") >= 2
        assert metric(scrape, "teisup_requests_in_flight", instance="minilm") == 0
        assert await t.stop() == 0
    assert not any(TOKEN in line for line in t.log)


def grpcio_over_size(port: int, stubs: SimpleNamespace) -> tuple[Any, int]:
    """An over-size Embed, then a normal one on the same grpcio channel."""
    import grpc

    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        stub = stubs.pb2_grpc.TeiMultiplexerStub(channel)
        target = stubs.pb2.Target(instance_name="minilm")
        huge = stubs.tei_pb2.EmbedRequest(inputs="word " * (300 * 1024))
        try:
            stub.Embed(stubs.pb2.EmbedRequest(target=target, request=huge), timeout=60)
        except grpc.RpcError as error:
            refused = error
        else:  # pragma: no cover - the assertion below reports it
            refused = None
        small = stubs.tei_pb2.EmbedRequest(inputs="still serving")
        answer = stub.Embed(stubs.pb2.EmbedRequest(target=target, request=small), timeout=60)
        return refused, len(answer.embeddings)


async def test_grpc_over_size_message_and_arrow_metrics(
    tmp_path: Path, mux_stubs: SimpleNamespace
) -> None:
    import grpc
    import pyarrow as pa

    config = "grpc_max_message_size_mb = 1\n"
    async with teisup(tmp_path, config, env=embedded_env(tmp_path)) as t:
        await wait_state(t, "minilm", "running")
        refused, dim = await trio.to_thread.run_sync(grpcio_over_size, t.grpc_port, mux_stubs)
        assert refused is not None
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in refused.details()
        assert dim == 384

        def arrow_call() -> bytes:
            table = pa.table({"text": pa.array(TEXTS * 10, pa.string())})
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            with grpc.insecure_channel(f"127.0.0.1:{t.grpc_port}") as channel:
                stub = mux_stubs.pb2_grpc.TeiMultiplexerStub(channel)
                request = mux_stubs.pb2.EmbedArrowRequest(
                    target=mux_stubs.pb2.Target(model_id=MINILM),
                    arrow_ipc=bytes(sink.getvalue()),
                )
                return bytes(stub.EmbedArrow(request, timeout=60).arrow_ipc)

        output = await trio.to_thread.run_sync(arrow_call)
        assert pa.ipc.open_stream(output).read_all().num_rows == 30
        scrape = (await t.http.get("/metrics")).text
        labels = {"transport": "grpc", "instance": "minilm"}
        assert metric(scrape, "teisup_requests_total", method="Embed", code="OK", **labels) == 1
        assert (
            metric(scrape, "teisup_requests_total", method="Embed", code="RESOURCE_EXHAUSTED") == 1
        )
        assert metric(scrape, "teisup_requests_total", method="EmbedArrow", code="OK") == 1
        assert metric(scrape, "teisup_arrow_rows_sum", method="EmbedArrow") == 30
        assert await t.stop() == 0


async def test_model_replicas_keep_serving_while_one_restarts(
    tmp_path: Path, mux_stubs: SimpleNamespace
) -> None:
    """Two replicas of one model behind model_id routing; one restarts under load."""
    config = "".join(
        f'[[instances]]\nname = "{name}"\nmodel_id = "{MINILM}"\n' for name in ("rep-a", "rep-b")
    )
    async with teisup(tmp_path, config, env=embedded_env(tmp_path)) as t:
        await wait_state(t, "rep-a", "running")
        await wait_state(t, "rep-b", "running")
        failures: list[str] = []
        served = 0
        reached: dict[int, trio.Event] = {}
        done = trio.Event()

        def milestone(count: int) -> trio.Event:
            return reached.setdefault(count, trio.Event())

        async def client() -> None:
            nonlocal served
            async with httpx.AsyncClient(base_url=t.url, timeout=60) as http:
                while not done.is_set():
                    response = await http.post(
                        "/v1/embeddings", json={"input": "load", "model": MINILM}
                    )
                    if response.status_code != 200:
                        failures.append(response.text)
                        bounded.cancel()  # one failure fails the test: stop at once
                        return
                    served += 1
                    for count, event in reached.items():
                        if served >= count:
                            event.set()

        # Bounded: if the replicas stop serving, the milestones never come.
        with trio.move_on_after(600) as bounded:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(client)
                await milestone(10).wait()  # both replicas are under load
                restart = await t.http.post("/instances/rep-a/restart")
                assert restart.status_code == 200, restart.text
                await wait_state(t, "rep-a", "running")
                await milestone(served + 20).wait()  # and serve again after the restart
                done.set()
        assert failures == []
        assert not bounded.cancelled_caught, f"only {served} calls served in 600 s"
        scrape = (await t.http.get("/metrics")).text
        for name in ("rep-a", "rep-b"):
            assert (
                metric(
                    scrape,
                    "teisup_requests_total",
                    method="openai_embeddings",
                    instance=name,
                    code="OK",
                )
                > 0
            )
        assert await t.stop() == 0
