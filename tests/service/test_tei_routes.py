"""TEI 1.9.3's HTTP routes on the data plane, and OpenAI's model list, against real backends.

Two embedded backends on tiny random-weight models (a dense encoder and a
three-label classifier, ``tiny_models``) behind the multiplexer's
`MultiplexerService`, with the HTTP data plane served by hypercorn and called
with httpx: ``embed_all``, ``predict``, ``similarity``, ``decode``, ``info``,
``/embeddings`` and ``GET /v1/models``, their answers and TEI's errors. The
scores of random weights mean nothing, so shapes, order and labels are checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from ..embedded.conftest import needs_minilm, tiny_models  # noqa: F401 - the fixture
from ..grpc.conftest import EMBEDDED, Backend, Instances
from ..grpc.test_normalize import data_plane

pytestmark = [pytest.mark.slow, needs_minilm]


@pytest.fixture(scope="module")
def backends(tiny_models: dict[str, Path]) -> Iterator[dict[str, Backend]]:  # noqa: F811
    """The dense and the classifier model, each an embedded backend process."""
    started = {
        kind: Backend(EMBEDDED, "--model-id", str(tiny_models[kind]))
        for kind in ("dense", "classifier")
    }
    try:
        for backend in started.values():
            backend.wait_ready()
        yield started
    finally:
        for backend in started.values():
            backend.stop()


async def test_tei_routes_answer_as_tei(
    backends: dict[str, Backend],
    tiny_models: dict[str, Path],  # noqa: F811
) -> None:
    dense_id, classifier_id = str(tiny_models["dense"]), str(tiny_models["classifier"])
    truncating = SimpleNamespace(max_concurrent_requests=512, auto_truncate=True)
    instances = Instances(
        backends["dense"].record("dense", model_id=dense_id),
        # The same process as an instance set up with auto_truncate.
        backends["dense"].record("dense-cut", model_id=dense_id, spec=truncating),
        backends["classifier"].record("clf", model_id=classifier_id),
    )
    async with (
        data_plane(instances) as (_, url),
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):

        async def post(path: str, body: Any, status: int = 200) -> Any:
            response = await http.post(path, json=body)
            assert response.status_code == status, (path, body, response.text)
            return response.json()

        # /tokenize then /decode: the ids come back as the text, one or a batch.
        (tokens,) = await post("/instances/dense/tokenize", {"inputs": "hello world"})
        ids = [t["id"] for t in tokens]
        assert await post("/instances/dense/decode", {"ids": ids}) == ["hello world"]
        assert await post(
            "/instances/dense/decode", {"ids": [ids, ids[1:2]], "skip_special_tokens": False}
        ) == ["[CLS] hello world [SEP]", "hello"]

        # /embed_all: one vector per token, per input.
        (per_token,) = await post("/instances/dense/embed_all", {"inputs": "hello world"})
        assert [len(v) for v in per_token] == [32] * len(tokens)
        two = await post("/instances/dense/embed_all", {"inputs": ["a", "hello world"]})
        assert [len(rows) for rows in two] == [3, len(tokens)]

        # /similarity: cosine similarity of the source with each sentence.
        sentences = ["hello world", "something else entirely", "hello world"]
        scores = await post(
            "/instances/dense/similarity",
            {"inputs": {"source_sentence": "hello world", "sentences": sentences}},
        )
        (source, *others) = await post(
            "/instances/dense/embed", {"inputs": ["hello world", *sentences]}
        )
        expected = [float(np.dot(source, other)) for other in others]
        assert scores == pytest.approx(expected, abs=1e-5)
        assert scores[0] == pytest.approx(1.0, abs=1e-5) == scores[2]

        # truncate left out: the instance's auto_truncate decides, as TEI's --auto-truncate.
        long = {"inputs": "word " * 200}  # over the tiny model's 64 tokens
        refused = await post("/instances/dense/embed", long, 422)
        assert "must have less than 64 tokens" in refused["error"]
        assert len((await post("/instances/dense-cut/embed", long))[0]) == 32
        await post("/instances/dense-cut/embed", {**long, "truncate": False}, 422)
        assert len((await post("/instances/dense/embed", {**long, "truncate": True}))[0]) == 32

        # /info: TEI's /info JSON from the instance's Info.
        info = (await http.get("/instances/dense/info")).json()
        assert info["model_id"] == dense_id
        assert info["version"].startswith("1.9.3+teisup.")
        assert list(info["model_type"]) == ["embedding"]
        assert info["max_input_length"] == 64
        assert info["auto_truncate"] is False
        assert (await http.get("/instances/dense-cut/info")).json()["auto_truncate"] is True
        assert info["max_client_batch_size"] == 32
        assert (info["sha"], info["docker_label"], info["max_batch_requests"]) == (
            None,
            None,
            None,
        )
        clf_info = (await http.get("/instances/clf/info")).json()
        assert list(clf_info["model_type"]) == ["classifier"]

        # /predict: one text, one pair, or a batch of both; labels best first.
        single = await post("/instances/clf/predict", {"inputs": "great film"})
        assert sorted(p["label"] for p in single) == ["NEG", "NEU", "POS"]
        assert [p["score"] for p in single] == sorted((p["score"] for p in single), reverse=True)
        assert sum(p["score"] for p in single) == pytest.approx(1.0, abs=1e-5)  # softmax
        pair = await post("/instances/clf/predict", {"inputs": ["a question", "an answer"]})
        assert len(pair) == 3
        assert isinstance(pair[0], dict)
        batch = await post(
            "/instances/clf/predict",
            {"inputs": [["great film"], ["a question", "an answer"]], "raw_scores": True},
        )
        assert [len(b) for b in batch] == [3, 3]
        assert batch[1] != pair  # raw scores are not softmaxed
        assert {p["label"]: p["score"] for p in batch[0]} != {
            p["label"]: p["score"] for p in single
        }

        # What a model cannot do: TEI's 424 Backend, with its message.
        refused = await post("/instances/dense/predict", {"inputs": "x"}, 424)
        assert refused["error_type"] == "Backend"
        assert refused["error"] == "Backend error: Model is not a classifier model"
        refused = await post("/instances/clf/embed", {"inputs": "x"}, 424)
        assert refused["error"] == "Backend error: Model is not an embedding model"

        # Bad input: TEI's statuses and error types.
        cases = [
            ("similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty"),
            ("decode", {"ids": []}, 400, "Empty"),
            ("decode", {"ids": [[1], []]}, 400, "Empty"),
            ("decode", {"ids": [1, [2]]}, 422, "Validation"),
            ("decode", {"ids": [-1]}, 422, "Validation"),
            ("predict", {"inputs": ["a", "b", "c"]}, 422, "Validation"),
            ("predict", {"inputs": [["a", "b", "c"]]}, 422, "Validation"),
            ("predict", {"inputs": []}, 400, "Empty"),
            ("embed_all", {"inputs": []}, 400, "Empty"),
            ("embed_all", {"inputs": "x", "truncation_direction": "up"}, 422, "Validation"),
        ]
        for route, body, status, error_type in cases:
            error = await post(f"/instances/clf/{route}", body, status)
            assert error["error_type"] == error_type, (route, body, error)
        missing = await http.get("/instances/nope/info")
        assert (missing.status_code, missing.json()["error_type"]) == (404, "NotFound")

        # OpenAI: /embeddings is /v1/embeddings; /v1/models lists what `model` takes.
        body = {"input": ["hello world"], "model": "dense"}
        assert (await post("/embeddings", body))["data"] == (await post("/v1/embeddings", body))[
            "data"
        ]
        models = (await http.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == [
            "clf",
            "dense",
            "dense-cut",
            classifier_id,
            dense_id,
        ]
        assert {m["object"] for m in models["data"]} == {"model"}
        for model in models["data"]:
            listed = await http.post("/v1/embeddings", json={"input": "x", "model": model["id"]})
            # Every listed name routes: the embedding model answers, the classifier
            # refuses as TEI does, and nothing is "not found".
            assert listed.status_code in (200, 424), listed.text
