"""The model registry as a tei-manager user drives it: a real teisup, the real
huggingface_hub client, a loopback Hub serving a tiny model, the embedded backend.

Register, discover, download with progress (state, /metrics, log), smoke-test,
create an instance from the download and embed; and a manager killed in the
middle of a download leaves nothing in the cache that looks complete.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import trio

from teisup.models import HubDownloader, smoke_instance_name
from teisup.models.cache import STAGING_DIR, cached_model, repo_folder

from ..embedded.conftest import needs_minilm
from ..service.test_service_e2e import Teisup, teisup, wait_state
from .conftest import TINY, WEIGHTS
from .hub import LoopbackHub

#: Served by the Hub too, but put in the cache before teisup starts: discovered.
CACHED = "teisup-tests/cached-bert"
#: Registered, but the Hub has no such repository.
MISSING = "teisup-tests/not-on-the-hub"
#: A smoke test or a download starts a process that loads a model: generous
#: for a loaded machine; only a hang should fail.
SLOW = 300.0


def encoded(model_id: str) -> str:
    return quote(model_id, safe="")


def sample(metrics: str, name: str, model: str) -> float | None:
    match = re.search(rf'^{name}\{{model="{re.escape(model)}"\}} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else None


def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


async def wait_progress_log(t: Teisup, model_id: str, percent: int) -> None:
    """Until teisup logs ``model_id``'s download at ``percent``% or more."""
    pattern = re.compile(rf"downloading model {re.escape(model_id)}: (\d+)%")
    with trio.fail_after(60):
        while True:
            logged = t.logged  # before reading the log: a line added after is not missed
            if any((m := pattern.search(line)) and int(m[1]) >= percent for line in t.log):
                return
            await logged.wait()


def hub_env(tmp_path: Path, hub: LoopbackHub, *, embedded: bool) -> dict[str, str]:
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": "",
        "HUGGINGFACE_HUB_CACHE": "",
        "TEISUP_DEFAULT_INSTANCE": "false",
        # The manager downloads: online, whatever the test process holds (an
        # embedded engine loaded in it sets HF_HUB_OFFLINE=1 in its environment).
        "HF_HUB_OFFLINE": "0",
        # A held file must not time out while the test looks at the progress.
        "HF_HUB_DOWNLOAD_TIMEOUT": "120",
    }
    if embedded:
        # No TEI binary: instances run on the embedded backend.
        env.update({"TEI_BINARY_PATH": "", "PATH": os.defpath})
    return env


@pytest.mark.slow
@needs_minilm
async def test_register_discover_download_load_create_and_embed(
    tmp_path: Path, tiny_model: Path
) -> None:
    with LoopbackHub({TINY: tiny_model, CACHED: tiny_model}) as hub:
        cache = tmp_path / "hf" / "hub"
        await HubDownloader(cache, endpoint=hub.url).download(CACHED, lambda *r: None)
        config = f'models = ["{TINY}"]\n'
        env = hub_env(tmp_path, hub, embedded=True)
        async with teisup(tmp_path, config, env=env) as t:
            http = t.http
            # Discovery: the configured model and the one in the cache, sorted by id.
            listed = (await http.get("/models")).json()
            assert [(m["model_id"], m["status"], m["downloaded"]) for m in listed] == [
                (CACHED, "downloaded", True),
                (TINY, "available", False),
            ]
            cached = listed[0]
            assert cached["cache_path"].startswith(str(cache / repo_folder(CACHED)))
            assert cached["cache_size_bytes"] > 0
            assert cached["metadata"]["hidden_size"] == 32
            assert "cache_path" not in listed[1]  # absent keys are left out, as tei-manager

            # Register: 201, then 200 with the same entry; bad bodies are 400s.
            created = await http.post("/models", json={"model_id": MISSING})
            assert created.status_code == 201, created.text
            again = await http.post("/models", json={"model_id": MISSING})
            assert (again.status_code, again.json()) == (200, created.json())
            for body, code in (
                ({"model_id": "../etc"}, "VALIDATION_ERROR"),
                ({}, "MISSING_FIELD"),
                ({"model_id": 7}, "VALIDATION_ERROR"),
            ):
                refused = await http.post("/models", json=body)
                assert (refused.status_code, refused.json()["code"]) == (400, code), body
            unknown = await http.get(f"/models/{encoded('nobody/none')}")
            assert (unknown.status_code, unknown.json()["code"]) == (404, "MODEL_NOT_FOUND")

            # Download, held halfway through the weights: progress is visible.
            hub.held.add(WEIGHTS)
            url = f"/models/{encoded(TINY)}"
            answers: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:

                async def download() -> None:
                    answers.append(await http.post(f"{url}/download", timeout=SLOW))

                nursery.start_soon(download)
                assert await trio.to_thread.run_sync(hub.holding.wait, 60)
                # The Hub holds the weights halfway; the other files come in (the
                # tokenizer is most of them), and the log says so. (huggingface_hub
                # counts a file's bytes per 10 MB read, so of the tiny weights
                # nothing shows before the end.)
                sizes = file_sizes(tiny_model)
                total = sum(sizes.values())
                held_back = sizes[WEIGHTS] - sizes[WEIGHTS] // 2
                before_weights = total - sizes[WEIGHTS]
                step = before_weights * 100 // total // 10 * 10
                assert step > 0
                await wait_progress_log(t, TINY, step)
                during = (await http.get(url)).json()
                assert (during["status"], during["downloaded"]) == ("downloading", False)
                progress = during["progress"]
                assert progress["bytes_total"] == total
                assert progress["files_total"] == len(sizes)
                assert total * step / 100 <= progress["bytes_downloaded"] <= total - held_back
                assert step <= progress["percent"] < 100
                metrics = (await http.get("/metrics")).text
                assert sample(metrics, "teisup_model_download_total_bytes", TINY) == total
                seen = sample(metrics, "teisup_model_download_bytes", TINY) or 0
                assert total * step / 100 <= seen <= total - held_back
                ratio = sample(metrics, "teisup_model_download_progress_ratio", TINY) or 0
                assert step / 100 <= ratio < 1
                # One download or smoke test of a model at a time.
                for action in ("download", "load"):
                    busy = await http.post(f"{url}/{action}")
                    assert (busy.status_code, busy.json()["code"]) == (409, "MODEL_BUSY")
                hub.release()
            [done] = answers
            assert done.status_code == 200, done.text
            info = done.json()
            assert (info["status"], info["downloaded"]) == ("downloaded", True)
            assert info["progress"]["percent"] == 100
            assert cached_model(cache, TINY) is not None
            assert any(
                "downloading model" in line and TINY in line and "%" in line for line in t.log
            )
            assert any(f"model {TINY} downloaded" in line for line in t.log)
            metrics = (await http.get("/metrics")).text
            assert 'teisup_model_downloads_total{outcome="completed"} 1.0' in metrics

            # A failed download: 502, the model failed and not downloaded.
            failed = await http.post(f"/models/{encoded(MISSING)}/download")
            assert (failed.status_code, failed.json()["code"]) == (502, "MODEL_DOWNLOAD_FAILED")
            after = (await http.get(f"/models/{encoded(MISSING)}")).json()
            assert (after["status"], after["downloaded"]) == ("failed", False)
            assert after["download_error"]
            # ... which cannot be smoke-tested.
            refused = await http.post(f"/models/{encoded(MISSING)}/load")
            assert (refused.status_code, refused.json()["code"]) == (409, "MODEL_LOAD_FAILED")

            # Load: a real instance of the download starts, embeds once, stops.
            loaded = await http.post(f"{url}/load", timeout=SLOW)
            assert loaded.status_code == 200, loaded.text
            verified = loaded.json()
            assert verified["status"] == "verified", verified
            assert "verification_error" not in verified
            assert verified["last_verified"]
            names = [i["name"] for i in (await http.get("/instances")).json()]
            assert smoke_instance_name(TINY) not in names

            # An instance created from it serves embeddings of the tiny model.
            made = await http.post("/instances", json={"name": "tiny", "model_id": TINY})
            assert made.status_code == 201, made.text
            await wait_state(t, "tiny", "running")
            embedded = await http.post(
                "/instances/tiny/embed", json={"inputs": "hello"}, timeout=60
            )
            assert embedded.status_code == 200, embedded.text
            [vector] = embedded.json()
            assert len(vector) == 32
            # Every file the instance read came from the cache, none from the Hub:
            # the Hub saw exactly one download of each file.
            gets = [path for method, path in hub.requests if method == "GET"]
            weights = [path for path in gets if path.endswith(f"/{WEIGHTS}")]
            assert len(weights) == 2  # the pre-seeded CACHED, then TINY


async def test_a_manager_killed_mid_download_leaves_no_half_model(
    tmp_path: Path, tiny_model: Path
) -> None:
    cache = tmp_path / "hf" / "hub"
    with LoopbackHub({TINY: tiny_model}) as hub:
        hub.held.add(WEIGHTS)
        config = f'models = ["{TINY}"]\n'
        env = hub_env(tmp_path, hub, embedded=False)
        async with teisup(tmp_path, config, env=env) as t, trio.open_nursery() as nursery:

            async def download() -> None:
                with pytest.raises(httpx.TransportError):
                    await t.http.post(f"/models/{encoded(TINY)}/download", timeout=SLOW)

            nursery.start_soon(download)
            assert await trio.to_thread.run_sync(hub.holding.wait, 60)
            t.proc.send_signal(signal.SIGKILL)
            await t.proc.wait()
        # Half the weights are on disk, staged; nothing of the model is in the cache.
        staged = list((cache / STAGING_DIR).iterdir())
        assert len(staged) == 1
        assert not (cache / repo_folder(TINY)).exists()
        assert cached_model(cache, TINY) is None

        hub.held.clear()
        hub.release()
        async with teisup(tmp_path, config, env=env) as t:
            await t.wait_log("removed 1 unfinished download")
            assert not staged[0].exists()
            url = f"/models/{encoded(TINY)}"
            before = (await t.http.get(url)).json()
            assert (before["status"], before["downloaded"]) == ("available", False)
            done = await t.http.post(f"{url}/download", timeout=SLOW)
            assert done.status_code == 200, done.text
            assert done.json()["downloaded"] is True
            # Downloaded already: answered at once, nothing fetched again.
            fetched = len(hub.requests)
            again = await t.http.post(f"{url}/download")
            assert (again.status_code, len(hub.requests)) == (200, fetched)
