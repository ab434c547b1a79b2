"""A bounded load test: 500 concurrent grpcio clients through the multiplexer, a restart mid-run.

Two replicas of one model, targeted by ``model_id``; while the clients call,
one replica is restarted through the REST API. The multiplexer routes only to
running replicas and runs a call that its replica dropped once more on the
other, so no client sees a failure. Loopback only; 500 clients x 4 calls.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from .grpc_load import run_clients
from .harness import teisup

CLIENTS = 500
CALLS = 4
MODEL = "load/model"


@pytest.mark.slow
async def test_500_clients_two_replicas_one_restarted_mid_run_no_failed_call(
    tmp_path: Path, mux_stubs: SimpleNamespace
) -> None:
    # 500 callers keep each replica's single event loop busy; on a starved
    # machine its health check can take seconds to be answered, and an
    # instance shown unhealthy is not routed to. The probe's patience is
    # configuration; what is under test here is routing and failover.
    config = "health_check_timeout_secs = 30\n"
    async with teisup(tmp_path, config) as t:
        for name in ("rep-a", "rep-b"):
            await t.create(name, model_id=MODEL)
        before = (await t.wait_state("rep-a", "running"))["pid"]
        await t.wait_state("rep-b", "running")
        started = trio.Event()
        results = []

        async def load() -> None:
            results.append(
                await run_clients(
                    mux_stubs,
                    t.grpc_port,
                    clients=CLIENTS,
                    calls=CALLS,
                    target=lambda k: mux_stubs.pb2.Target(model_id=MODEL),
                    deadline=60,
                    connections=10,
                    started=started,
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await started.wait()
            await t.post("/instances/rep-a/restart")
            after = (await t.wait_state("rep-a", "running"))["pid"]
        (run,) = results
        assert after != before
        assert len(run.answers) == CLIENTS * CALLS
        failed = Counter(a.code for a in run.failures())
        assert not failed, (failed, run.seconds)
        assert {a.model_id for a in run.answers} == {MODEL}
        # The restart happened while calls were still being answered.
        assert run.seconds > 0
        assert await t.stop() == 0
