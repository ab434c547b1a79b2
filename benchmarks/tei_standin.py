#!/usr/bin/env python3
"""A fast TEI stand-in on grpcio, for measuring the multiplexer rather than a model.

teisup launches it as an instance (``TEI_BINARY_PATH=benchmarks/tei_standin.py``)
with TEI's command line; it takes the flags teisup passes (see
`teisup.instances.launch.build_argv`) and ignores any other. It binds
``127.0.0.1:--port`` on a ``grpc.aio`` server, logs TEI's ``Ready`` line (JSON
with ``--json-output``) and serves:

* ``grpc.health.v1.Health/Check``: SERVING for every service;
* ``tei.v1.Info/Info``: the ``--model-id`` and the limits from the flags;
* ``tei.v1.Embed/Embed`` and ``EmbedStream``, ``EmbedAll``, ``EmbedSparse``
  (and their streams): the same answer to every request, a fixed vector of
  ``STANDIN_DIM`` floats (384 by default, MiniLM's), encoded once at start.
  Requests are not even decoded: tens of microseconds a call.

It stops on SIGTERM or SIGINT, exiting 0, as TEI does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # type: ignore[import-untyped,unused-ignore]

from teisup.proto.grpc.health.v1 import health_pb2
from teisup.proto.tei.v1 import tei_pb2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default="standin/fixed-vector")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hostname", default="127.0.0.1")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-concurrent-requests", type=int, default=512)
    parser.add_argument("--max-client-batch-size", type=int, default=32)
    parser.add_argument("--json-output", action="store_true")
    args, _ignored = parser.parse_known_args(argv)  # --prometheus-port, --pooling, ...
    return args


def log(args: argparse.Namespace, message: str) -> None:
    if args.json_output:
        line = json.dumps({"timestamp": time.time(), "level": "INFO", "message": message})
    else:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ')}  INFO standin: {message}"
    print(line, flush=True)


def handlers(args: argparse.Namespace) -> list[Any]:
    dim = int(os.environ.get("STANDIN_DIM", "384"))
    vector = [((i * 37) % 101) / 101.0 for i in range(dim)]
    embed = tei_pb2.EmbedResponse(embeddings=vector).SerializeToString()
    embed_all = tei_pb2.EmbedAllResponse(
        token_embeddings=[tei_pb2.TokenEmbedding(embeddings=vector)]
    ).SerializeToString()
    sparse = tei_pb2.EmbedSparseResponse(
        sparse_embeddings=[tei_pb2.SparseValue(index=i, value=v) for i, v in enumerate(vector[:8])]
    ).SerializeToString()
    info = tei_pb2.InfoResponse(
        version="1.9.3",
        model_id=args.model_id,
        model_dtype="float32",
        model_type=tei_pb2.MODEL_TYPE_EMBEDDING,
        max_concurrent_requests=args.max_concurrent_requests,
        max_input_length=512,
        max_batch_tokens=args.max_batch_tokens,
        max_client_batch_size=args.max_client_batch_size,
        tokenization_workers=1,
    ).SerializeToString()
    serving = health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.SERVING
    ).SerializeToString()

    def fixed(answer: bytes) -> tuple[Any, Any]:
        async def unary(request: bytes, context: Any) -> bytes:
            return answer

        async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for _ in requests:
                yield answer

        return (
            grpc.unary_unary_rpc_method_handler(unary),
            grpc.stream_stream_rpc_method_handler(stream),
        )

    embed_u, embed_s = fixed(embed)
    all_u, all_s = fixed(embed_all)
    sparse_u, sparse_s = fixed(sparse)
    info_u, _ = fixed(info)
    health_u, _ = fixed(serving)
    return [
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": health_u}),
        grpc.method_handlers_generic_handler("tei.v1.Info", {"Info": info_u}),
        grpc.method_handlers_generic_handler(
            "tei.v1.Embed",
            {
                "Embed": embed_u,
                "EmbedStream": embed_s,
                "EmbedAll": all_u,
                "EmbedAllStream": all_s,
                "EmbedSparse": sparse_u,
                "EmbedSparseStream": sparse_s,
            },
        ),
    ]


async def serve(args: argparse.Namespace) -> None:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(handlers(args))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    log(args, "Ready")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log(args, "signal received, starting graceful shutdown")
    await server.stop(0.5)


def main() -> int:
    args = parse_args()
    log(args, f"Args {{ model_id: {args.model_id!r}, port: {args.port} }}")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
