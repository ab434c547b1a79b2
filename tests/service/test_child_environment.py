"""What an instance's processes can read of the manager: none of its secrets."""

from __future__ import annotations

from pathlib import Path

import trio

from teisup.instances.process import descendants

from .test_service_e2e import SMALL, TOKEN, teisup, wait_state


async def test_an_instance_never_sees_the_managers_token_or_settings(tmp_path: Path) -> None:
    env = {
        "TEISUP_API_TOKEN": TOKEN,
        "TEISUP_MANAGER_ID": "env-check",
        "HF_TOKEN": "hf-token-the-router-needs",
    }
    async with teisup(tmp_path, env=env) as t:
        t.http.headers["Authorization"] = f"Bearer {TOKEN}"
        assert (await t.http.post("/instances", json=SMALL)).status_code == 201
        info = await wait_state(t, "bge-small", "running")
        pid = info["pid"]
        assert isinstance(pid, int)
        tree = [pid, *descendants(pid)]
        for member in tree:
            raw = await trio.Path(f"/proc/{member}/environ").read_bytes()
            environ = dict(item.partition(b"=")[::2] for item in raw.split(b"\0") if item)
            assert TOKEN.encode() not in raw, member
            names = {name.decode() for name in environ}
            assert not {n for n in names if n.startswith(("TEISUP_API", "TEI_MANAGER_"))}
            assert "TEI_BINARY_PATH" not in names
            assert "TEISUP_MANAGER_ID" not in names
            # What the router needs, and the markers the manager finds it by, stay.
            assert environ[b"HF_TOKEN"] == b"hf-token-the-router-needs"
            assert environ[b"TEISUP_OWNED_BY"] == b"env-check"
            assert environ[b"TEISUP_INSTANCE"] == b"bge-small"
        assert await t.stop() == 0
