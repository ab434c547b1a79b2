"""The command line, offline model resolution and the metrics text: no torch needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import teisup
from teisup.embedded.cli import Settings, available_cpus, parse_settings
from teisup.embedded.metrics import Metrics, serve_metrics
from teisup.embedded.models import ModelNotFound, resolve_model


def test_defaults_are_teis() -> None:
    settings = parse_settings(["--model-id", "m"], env={})
    assert settings == Settings(model_id="m")
    assert parse_settings([], env={"MODEL_ID": "m"}) == settings
    assert settings.auto_truncate is True  # TEI 1.9's default
    assert (settings.served_model_name, settings.model_name) == (None, "m")
    assert (settings.port, settings.prometheus_port, settings.max_batch_tokens) == (
        3000,
        9000,
        16384,
    )
    assert (settings.max_concurrent_requests, settings.max_client_batch_size) == (512, 32)


def test_flags_and_environment() -> None:
    env = {"PORT": "8081", "MAX_BATCH_TOKENS": "512", "JSON_OUTPUT": "true", "API_KEY": "k"}
    argv = ["--model-id", "m", "--port", "8082", "--auto-truncate", "--pooling", "splade"]
    settings = parse_settings(argv, env=env)
    assert settings.port == 8082  # the command line wins
    assert settings.max_batch_tokens == 512
    assert settings.json_output is True
    assert settings.auto_truncate is True
    assert (settings.api_key, settings.pooling) == ("k", "splade")
    # Docker's HOSTNAME (a container id) is not an IP: TEI falls back to 0.0.0.0.
    docker = parse_settings(["--model-id", "m"], env={"HOSTNAME": "76f54a599a7b"})
    assert docker.hostname == "0.0.0.0"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, True),
        (["--auto-truncate"], {}, True),
        (["--auto-truncate", "true"], {}, True),
        (["--auto-truncate", "false"], {}, False),
        (["--auto-truncate=false"], {}, False),
        (["--auto-truncate", "--port", "1"], {}, True),
        ([], {"AUTO_TRUNCATE": "false"}, False),
        (["--auto-truncate", "true"], {"AUTO_TRUNCATE": "false"}, True),
    ],
)
def test_auto_truncate_takes_an_optional_value(
    argv: list[str], env: dict[str, str], expected: bool
) -> None:
    assert parse_settings(["--model-id", "m", *argv], env=env).auto_truncate is expected


def test_served_model_name() -> None:
    settings = parse_settings(["--model-id", "org/m", "--served-model-name", "prod"], env={})
    assert (settings.served_model_name, settings.model_name) == ("prod", "prod")
    from_env = parse_settings(["--model-id", "org/m"], env={"SERVED_MODEL_NAME": "alias"})
    assert from_env.model_name == "alias"


def test_tokenization_workers_default_to_the_cpus_this_process_may_use(
    tmp_path: Path,
) -> None:
    import os

    allowed = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path)) == allowed  # no cgroup file: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == allowed
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert available_cpus(str(tmp_path)) == min(allowed, 2)
    (tmp_path / "cpu.max").write_text("1000 100000\n")
    assert available_cpus(str(tmp_path)) == 1
    assert parse_settings(["--model-id", "m"], env={}).workers == available_cpus()
    flagged = parse_settings(["--model-id", "m", "--tokenization-workers", "3"], env={})
    assert flagged.workers == 3


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--bogus"], {}),
        (["--port"], {}),
        (["--port", "70000"], {}),
        (["--max-batch-tokens", "-1"], {}),
        (["--pooling", "max"], {}),
        (["--auto-truncate", "yes"], {}),
        ([], {"AUTO_TRUNCATE": "1"}),
        (["--default-prompt", "a", "--default-prompt-name", "b"], {}),
        (["--max-batch"], {}),  # no prefix guessing
        ([], {"JSON_OUTPUT": "1"}),  # clap: exactly true or false
        ([], {"PORT": "eighty"}),
        ([], {"DEFAULT_PROMPT": "a", "DEFAULT_PROMPT_NAME": "b"}),
        (None, {}),  # no --model-id: required since TEI 1.9.0
    ],
)
def test_usage_errors_exit_2(
    argv: list[str] | None, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings([] if argv is None else ["--model-id", "m", *argv], env=env)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: text-embeddings-router" in err
    assert "error:" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--version"], env={})
    assert exit_.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"text-embeddings-router 1.9.3+teisup.{teisup.__version__}"


def test_models_resolve_offline(tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert resolve_model(str(local), env={}).source == "directory"

    cache = tmp_path / "hub"
    repo = cache / "models--org--cached"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    found = resolve_model("org/cached", env={"HF_HOME": str(tmp_path)})
    assert (found.path, found.source) == (snapshot, "hub-cache")
    assert resolve_model("org/cached", revision="abc123", hub_cache=str(cache)).path == snapshot

    with pytest.raises(ModelNotFound) as err:
        resolve_model("org/missing", hub_cache=str(cache), env={})
    message = str(err.value)
    assert "not available offline" in message
    assert str(cache) in message
    assert "local directory org/missing" in message
    assert len(err.value.places) == 3


def test_metrics_text_is_the_exporters() -> None:
    metrics = Metrics()
    metrics.inc("te_request_count", method="single")
    metrics.inc("te_request_failure", err="validation")
    metrics.set("te_queue_size", 3)
    metrics.observe("te_request_duration", 0.002)
    metrics.observe("te_batch_next_size", 5)
    text = metrics.render()
    assert '# TYPE te_request_count counter\nte_request_count{method="single"} 1\n' in text
    assert "te_queue_size 3\n" in text
    assert 'te_batch_next_size_bucket{le="4"} 0\n' in text
    assert 'te_batch_next_size_bucket{le="8"} 1\n' in text
    assert 'te_request_duration_bucket{le="+Inf"} 1\n' in text
    assert "te_request_duration_count 1\n" in text
    assert "_total" not in text
    assert "te_embed_count" not in text  # a metric appears once used
    assert Metrics().render() == ""


async def test_exporter_serves_health_and_metrics() -> None:
    metrics = Metrics()
    metrics.inc("te_embed_count")

    async def get(port: int, path: str) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
        return data

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        health = await get(port, "/health")
        assert health.startswith(b"HTTP/1.1 200 OK\r\n")
        assert health.endswith(b"\r\n\r\nOK")
        assert b"te_embed_count 1" in await get(port, "/anything")
        with pytest.raises(OSError, match=r"(?i)address already in use"):  # fails at bind
            await nursery.start(serve_metrics, metrics, "127.0.0.1", port)
        nursery.cancel_scope.cancel()
