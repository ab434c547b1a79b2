"""Bad input over real HTTP: a clear 4xx naming what is wrong, and nothing else touched.

A real teisup process with the TEI test double (issue 11: absurd numbers,
``dimensions`` past uint32, JSON nested too deep, 405 without ``Allow``,
waiting on an instance that cannot get there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .test_service_e2e import SMALL, Teisup, teisup, wait_state

#: The body of issue 11: this backoff overflowed inside the supervisor and
#: took every instance down.
ISSUE_11_BACKOFF = {"initial": 5e-324, "factor": 1e300, "maximum": 60}

ABSURD: list[tuple[dict[str, Any], str]] = [
    ({"restart": {"backoff": ISSUE_11_BACKOFF}}, "$.restart.backoff.factor"),
    ({"max_batch_tokens": 2**70}, "$.max_batch_tokens"),
    ({"max_concurrent_requests": 2**40}, "$.max_concurrent_requests"),
    ({"restart": {"max_restarts": 2**70}}, "$.restart.max_restarts"),
    ({"restart": {"window_secs": 1e308}}, "$.restart.window_secs"),
    ({"stop_grace_secs": 1e308}, "$.stop_grace_secs"),
    ({"gpu_id": 2**40}, "$.gpu_id"),
]

JSON_ROUTES = [
    "/instances",
    "/instances/bge-small/embed",
    "/instances/bge-small/embed_sparse",
    "/instances/bge-small/rerank",
    "/instances/bge-small/tokenize",
    "/v1/embeddings",
]


async def snapshot(t: Teisup) -> list[tuple[object, ...]]:
    listing = (await t.http.get("/instances")).json()
    return [(i["name"], i["status"], i["pid"], i["restarts"]) for i in listing]


async def post_json(t: Teisup, path: str, body: bytes) -> httpx.Response:
    return await t.http.post(path, content=body, headers={"content-type": "application/json"})


async def test_absurd_numbers_are_refused_naming_the_field_and_nothing_is_touched(
    tmp_path: Path,
) -> None:
    async with teisup(tmp_path) as t:
        for name in ("bge-small", "other"):
            assert (
                await t.http.post("/instances", json={**SMALL, "name": name})
            ).status_code == 201
            await wait_state(t, name, "running")
        before = await snapshot(t)
        state_before = (tmp_path / "state.toml").read_bytes()

        for patch, field in ABSURD:
            # The standard library writes 2**70 as the integer a client sends.
            body = json.dumps({**SMALL, "name": "absurd", **patch}).encode()
            refused = await post_json(t, "/instances", body)
            assert refused.status_code == 400, (patch, refused.text)
            assert (refused.json()["code"], field in refused.json()["error"]) == (
                "VALIDATION_ERROR",
                True,
            ), refused.text

        assert await snapshot(t) == before
        assert (tmp_path / "state.toml").read_bytes() == state_before
        assert (await t.http.get("/health")).json()["instances"]["status"] == "healthy"
        assert await t.stop() == 0


async def test_dimensions_past_uint32_are_422_naming_the_field(tmp_path: Path) -> None:
    async with teisup(tmp_path) as t:
        assert (await t.http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        for dimensions in (2**32, 2**64, 0):
            tei = await t.http.post(
                "/instances/bge-small/embed", json={"inputs": "a", "dimensions": dimensions}
            )
            assert tei.status_code == 422, tei.text
            assert "$.dimensions" in tei.json()["error"]
            assert tei.json()["error_type"] == "Validation"
            openai = await t.http.post(
                "/v1/embeddings",
                json={"input": "a", "model": "bge-small", "dimensions": dimensions},
            )
            assert openai.status_code == 422, openai.text
            assert "$.dimensions" in openai.json()["error"]["message"]
        assert await t.stop() == 0


@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_json_nested_too_deep_is_400_on_every_json_route(tmp_path: Path, depth: int) -> None:
    async with teisup(tmp_path) as t:
        assert (await t.http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        bodies = [
            b"[" * depth + b"]" * depth,
            b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}",
            b'{"unknown": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}",
        ]
        for path in JSON_ROUTES:
            for body in bodies:
                refused = await post_json(t, path, body)
                assert refused.status_code == 400, (path, refused.text)
                assert "nested deeper than 64 levels" in refused.text
        # Still serving, and the instance untouched.
        assert (await t.http.get("/instances/bge-small")).json()["status"] == "running"
        assert await t.stop() == 0


async def test_a_405_lists_the_methods_the_route_takes(tmp_path: Path) -> None:
    async with teisup(tmp_path) as t:
        expected = {
            ("PUT", "/instances"): {"GET", "POST"},
            ("PATCH", "/instances/x"): {"GET", "DELETE"},
            ("DELETE", "/health"): {"GET"},
            ("GET", "/instances/x/start"): {"POST"},
            ("GET", "/v1/embeddings"): {"POST"},
        }
        for (method, path), methods in expected.items():
            answer = await t.http.request(method, path)
            assert answer.status_code == 405, (method, path)
            assert answer.json()["code"] == "METHOD_NOT_ALLOWED"
            allowed = {m.strip() for m in answer.headers["Allow"].split(",")}
            assert methods <= allowed, (method, path, allowed)
            assert method not in allowed
        assert await t.stop() == 0


FAILING = {
    **SMALL,
    "name": "broken",
    # The TEI double refuses an unknown flag (exit 2); no restart is allowed.
    "extra_args": ["--no-such-flag"],
    "restart": {"max_restarts": 0},
}


async def test_waiting_for_a_state_that_cannot_come_answers_at_once(tmp_path: Path) -> None:
    async with teisup(tmp_path) as t:
        http = t.http  # times out after 30 s; each wait below asks for 600
        assert (await http.post("/instances", json=FAILING)).status_code == 201
        failed = await http.get("/instances/broken", params={"wait": "failed", "timeout": 60})
        assert (failed.status_code, failed.json()["status"]) == (200, "failed")

        stuck = await http.get("/instances/broken", params={"wait": "running", "timeout": 600})
        assert (stuck.status_code, stuck.json()["code"]) == (409, "STATE_UNREACHABLE")
        assert "failed" in stuck.json()["error"]

        assert (await http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        assert (await http.post("/instances/bge-small/stop")).json()["status"] == "stopped"
        stopped = await http.get("/instances/bge-small", params={"wait": "running", "timeout": 600})
        assert (stopped.status_code, stopped.json()["code"]) == (409, "STATE_UNREACHABLE")
        assert "stopped" in stopped.json()["error"]

        # A start makes running reachable again: the wait answers when it is.
        assert (await http.post("/instances/bge-small/start")).status_code == 200
        await wait_state(t, "bge-small", "running")

        # Reachable but not reached in time: the client's condition is unmet,
        # which is a 409 naming the current state, not a server error.
        late = await http.get("/instances/bge-small", params={"wait": "stopping", "timeout": 0.2})
        assert (late.status_code, late.json()["code"]) == (409, "WAIT_TIMEOUT")
        assert "running" in late.json()["error"]
        assert await t.stop() == 0


async def test_a_wait_ends_with_404_when_the_instance_is_deleted(tmp_path: Path) -> None:
    async with teisup(tmp_path) as t:
        assert (await t.http.post("/instances", json=SMALL)).status_code == 201
        await wait_state(t, "bge-small", "running")
        answers: list[httpx.Response] = []

        async def wait_for_failed() -> None:
            # Running, desired running: failed is reachable (a crash), so it waits.
            params = {"wait": "failed", "timeout": 600}
            answers.append(await t.http.get("/instances/bge-small", params=params))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_failed)
            # A round trip on another connection: by then the wait is in.
            await t.http.get("/instances/bge-small")
            deleted = await t.http.delete("/instances/bge-small")
            assert deleted.status_code == 204
        [answer] = answers
        assert (answer.status_code, answer.json()["code"]) == (404, "INSTANCE_NOT_FOUND")
        assert await t.stop() == 0
