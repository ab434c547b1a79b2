"""The pure readers of an instance's lines: start-up phases and the error it died of."""

from __future__ import annotations

import pytest

from teisup.instances.startup import Phase, PhaseLine, classify, summarize_error

TEI = "2025-11-13T12:06:25.650647Z  INFO "


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # TEI's own start-up lines, text layout (span and target prefixes).
        (
            TEI + "text_embeddings_router: router/src/main.rs:203: Args { model_id: "
            '"BAAI/bge-small-en-v1.5", port: 80 }',
            None,
        ),
        (
            TEI + "download_artifacts: text_embeddings_core::download: core/src/download.rs:42: "
            "Starting download",
            PhaseLine(Phase.DOWNLOADING),
        ),
        (
            TEI + "download_artifacts: text_embeddings_core::download: core/src/download.rs:18: "
            "Downloading `config.json`",
            PhaseLine(Phase.DOWNLOADING),
        ),
        (
            TEI + "download_artifacts: text_embeddings_core::download: core/src/download.rs:72: "
            "Model artifacts downloaded in 1.23s",
            PhaseLine(Phase.LOADING),
        ),
        (
            TEI + "text_embeddings_router: router/src/lib.rs:264: Starting model backend",
            PhaseLine(Phase.LOADING),
        ),
        (
            TEI + "text_embeddings_backend_candle: backends/candle/src/lib.rs:300: "
            "Starting FlashBert model on Cuda(CudaDevice(DeviceId(1)))",
            PhaseLine(Phase.LOADING),
        ),
        (
            TEI + "text_embeddings_router: router/src/lib.rs:282: Warming up model",
            PhaseLine(Phase.WARMING_UP),
        ),
        (
            TEI + "text_embeddings_router::grpc::server: router/src/grpc/server.rs:1510: "
            "Starting gRPC server: 0.0.0.0:80",
            None,
        ),
        (
            TEI + "text_embeddings_router::grpc::server: router/src/grpc/server.rs:1511: Ready",
            PhaseLine(Phase.READY),
        ),
        # The embedded backend's own line, and a HuggingFace progress bar.
        (
            TEI + "text_embeddings_router: router/src/main.rs:210: Model "
            "sentence-transformers/all-MiniLM-L6-v2 found at /m (hub-cache)",
            PhaseLine(Phase.LOADING),
        ),
        (
            "model.safetensors:  45%|████▌     | 41.0M/90.9M [00:02<00:02, 20.1MB/s]",
            PhaseLine(Phase.DOWNLOADING, 45.0),
        ),
        (
            "model.safetensors:   5%|▌ | 4M/90M\rmodel.safetensors:  62%|██▌ |",
            PhaseLine(Phase.DOWNLOADING, 62.0),
        ),
        ("some unrelated line", None),
        ("", None),
    ],
)
def test_a_line_says_its_phase(text: str, expected: PhaseLine | None) -> None:
    assert classify(text) == expected


def test_a_json_line_is_read_by_its_message() -> None:
    line = '{"timestamp":"x","level":"INFO","message":"Warming up model","target":"t"}'
    assert classify(line, "Warming up model") == PhaseLine(Phase.WARMING_UP)
    assert classify(line, "Ready") == PhaseLine(Phase.READY)


OFFLINE = [
    "Error: Could not download model artifacts",
    "",
    "Caused by:",
    "    model 'nobody/nothing' is not available offline (no network access is attempted); "
    "looked in:",
    "  - /root/.cache/huggingface/hub/models--nobody--nothing",
    "  - the packaged models",
]


@pytest.mark.parametrize(
    ("lines", "status", "text", "permanent"),
    [
        (
            OFFLINE,
            1,
            "model 'nobody/nothing' is not available offline (no network access is attempted)",
            True,
        ),
        (
            [
                'Args { model_id: "x", port: 1 }',
                "Error: Could not download model artifacts",
                "",
                "Caused by:",
                "    request error: x is not a valid model id",
            ],
            1,
            "request error: x is not a valid model id",
            False,
        ),
        (
            [
                "Error: Could not create backend",
                "",
                "Caused by:",
                "    0: Could not start backend",
                "    1: Runtime compute cap 90 is not compatible",
            ],
            1,
            "Runtime compute cap 90 is not compatible",
            False,
        ),
        (["Error: Model backend is not healthy"], 1, "Model backend is not healthy", False),
        (
            [
                "error: unexpected argument '--frobnicate' found",
                "",
                "Usage: text-embeddings-router [OPTIONS]",
                "",
                "For more information, try '--help'.",
            ],
            2,
            "unexpected argument '--frobnicate' found",
            True,
        ),
        (
            [
                "usage: fake_tei.py [-h]",
                "fake_tei.py: error: the following arguments are required: --model-id",
            ],
            2,
            "the following arguments are required: --model-id",
            True,
        ),
        (
            [
                "thread 'main' panicked at router/src/lib.rs:100:5:",
                "tokenizer.json not found. text-embeddings-inference only supports fast tokenizers",
            ],
            101,
            "tokenizer.json not found. text-embeddings-inference only supports fast tokenizers",
            False,
        ),
        (
            [
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "    boom()",
                "RuntimeError: boom",
            ],
            1,
            "RuntimeError: boom",
            False,
        ),
        (['Args { model_id: "x" }', "Starting model backend"], -9, "Starting model backend", False),
        (['Args { model_id: "x" }'], 1, None, False),
    ],
)
def test_the_error_a_process_died_of(
    lines: list[str], status: int, text: str | None, permanent: bool
) -> None:
    summary = summarize_error(lines, status=status)
    if text is None:
        assert summary is None
        return
    assert summary is not None
    assert (summary.text, summary.permanent) == (text, permanent)
