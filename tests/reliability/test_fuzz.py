"""A REST fuzz from the served OpenAPI document: no 5xx, every answer as documented.

schemathesis reads ``/openapi.json`` from a real teisup process (TEI test
double instances, so lifecycle routes do real work quickly) and sends cases
it generates from it, valid and invalid, to every operation. Each answer must
not be a 5xx, must have a documented status and content type, and must
conform to its documented schema.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from ..ports import free_port, private_port_block, with_private_ports

pytestmark = pytest.mark.slow

FAKE_TEI = Path(__file__).resolve().parents[1] / "fake_tei.py"
SEEDS = ("alpha", "beta")
CONFIG = "max_instances = 4\n" + "".join(
    f'[[instances]]\nname = "{name}"\nmodel_id = "BAAI/bge-small-en-v1.5"\n' for name in SEEDS
)
#: Per operation and mode: the 13 operations with inputs x (60 + 30) is
#: over 1,000 cases (one with no inputs is sent once).
EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 30}
DATA_PLANE = {
    "POST /instances/{name}/embed",
    "POST /instances/{name}/embed_all",
    "POST /instances/{name}/embed_sparse",
    "POST /instances/{name}/predict",
    "POST /instances/{name}/rerank",
    "POST /instances/{name}/similarity",
    "POST /instances/{name}/tokenize",
    "POST /instances/{name}/decode",
    "GET /instances/{name}/info",
    "POST /v1/embeddings",
    "POST /embeddings",
}


#: The data plane's gateway answers, TEI's error types: the instance the call
#: named is not running (the fuzz stops and restarts the seeds) or the call ran
#: past its deadline. Every other 5xx, on any route, is a failure.
GATEWAY = {503: "Unhealthy", 504: "Timeout"}
gateway_answers: Counter[str] = Counter()


def no_internal_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx but the data plane's gateway answers."""
    status = response.status_code
    if status < 500:
        return None
    label = case.operation.label
    if label in DATA_PLANE and status in GATEWAY:
        body = response.json()
        error_type = body.get("error_type") or body.get("error", {}).get("type")
        assert error_type == GATEWAY[status], response.text
        gateway_answers[f"{status} {label}"] += 1
        return None
    if label == "POST /models/{model_id}/download" and status == 502:
        # The Hub (a closed loopback port here) did not answer: a gateway answer too.
        assert response.json()["code"] == "MODEL_DOWNLOAD_FAILED", response.text
        gateway_answers[f"{status} {label}"] += 1
        return None
    raise AssertionError(f"{status} from {label}: {response.text}")


CHECKS = [
    no_internal_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
#: The longest a ?wait= may take here, so that generated waits stay short.
WAIT_CAP = 0.5


@pytest.fixture
def teisup_url(tmp_path: Path) -> Iterator[str]:
    """A running teisup with two seed instances on the TEI test double."""
    router = tmp_path / "text-embeddings-router"
    router.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TEI}" "$@"\n')
    router.chmod(0o755)
    (tmp_path / "teisup.toml").write_text(with_private_ports(CONFIG, private_port_block()))
    port = free_port()
    argv = [
        sys.executable, "-m", "teisup", "-c", str(tmp_path / "teisup.toml"),
        "--api-port", str(port), "--grpc-port", str(free_port()),
        "--state-file", str(tmp_path / "state.toml"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "TEI_BINARY_PATH": str(router),
        "TEISUP_BIND_HOST": "127.0.0.1",
        # Model downloads go to a port nothing listens on, into a private cache.
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": "",
        "HUGGINGFACE_HUB_CACHE": "",
    }
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    listening = threading.Event()
    log: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if "REST API listening on" in line:
                listening.set()
        listening.set()  # exited: let the waiter see it

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert listening.wait(60)
        assert proc.poll() is None, "".join(log)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            reader.join(10)
            assert proc.stderr is not None
            proc.stderr.close()
    assert not [line for line in log if "Traceback" in line], "".join(log)


def _shorten_waits(case: Any) -> None:
    query = case.query
    if not isinstance(query, dict) or "wait" not in query:
        return
    timeout = query.get("timeout")
    if timeout is None or (isinstance(timeout, int | float) and timeout > WAIT_CAP):
        query["timeout"] = WAIT_CAP


def test_generated_requests_get_no_5xx_and_documented_answers(teisup_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{teisup_url}/openapi.json")
    failures: dict[str, str] = {}
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = httpx.get(f"{teisup_url}/openapi.json").json()["paths"]
    documented = {
        f"{method.upper()} {path}" for path, methods in paths.items() for method in methods
    }
    # schemathesis leaves out the document's own route, which it has just read.
    assert documented - {op.label for op in operations} <= {"GET /openapi.json"}
    for operation in operations:
        for mode, examples in EXAMPLES.items():

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            @given(
                case=operation.as_strategy(generation_mode=mode),
                seed=st.sampled_from(SEEDS) if mode is GenerationMode.POSITIVE else st.none(),
            )
            def one(case: Any, seed: str | None) -> None:
                # Positive cases name a seed, so lifecycle and data-plane routes
                # act on a real instance rather than answer 404; DELETE keeps
                # its generated names, so the seeds stay for what follows.
                params = case.path_parameters
                if seed is not None and params and "name" in params and case.method != "DELETE":
                    params["name"] = seed
                _shorten_waits(case)
                response = case.call_and_validate(base_url=teisup_url, checks=CHECKS, timeout=30)
                statuses[response.status_code] += 1

            try:
                one()
            except Unsatisfiable:
                # No invalid request exists for an operation without inputs.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # every operation gets its run
                failures[f"{operation.label} ({mode.value})"] = f"{type(exc).__name__}: {exc}"
    print(f"statuses of {statuses.total()} answers: {dict(sorted(statuses.items()))}")
    print(f"data-plane gateway answers: {dict(gateway_answers)}")
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert statuses.total() >= 1000
    # The lifecycle routes did real work on the seeds, not only refuse input.
    assert statuses[200] + statuses[201] + statuses[204] >= 200
