#!/usr/bin/env python3
"""The reference multiplexer: the least a grpcio.aio proxy does for one unary call.

    python benchmarks/reference_mux.py --port P --route NAME=HOST:PORT [--route ...]

Serves ``tei_multiplexer.v1.TeiMultiplexer/Embed`` (and ``Info``) the naive
way: decode the request, pick the instance by ``target.instance_name``,
forward the inner ``request`` over one shared ``grpc.aio`` channel per
instance, decode the answer and send it back. An unknown instance is
NOT_FOUND, a missing ``request`` INVALID_ARGUMENT, a backend error passes
through. No health, metrics, limits or model-id routing: the yardstick that
`benchmarks/mux_compare.py` measures teisup's per-call cost against.
Prints ``listening <port>`` once serving; stops on SIGTERM, SIGINT or end of stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # type: ignore[import-untyped,unused-ignore]

from teisup.proto.tei.v1 import tei_pb2
from teisup.proto.tei_multiplexer.v1 import multiplexer_pb2 as mux_pb2

MUX = "tei_multiplexer.v1.TeiMultiplexer"


async def serve(port: int, routes: dict[str, str]) -> None:
    channels = {name: grpc.aio.insecure_channel(address) for name, address in routes.items()}
    embeds = {
        name: channel.unary_unary(
            "/tei.v1.Embed/Embed",
            request_serializer=tei_pb2.EmbedRequest.SerializeToString,
            response_deserializer=tei_pb2.EmbedResponse.FromString,
        )
        for name, channel in channels.items()
    }
    infos = {
        name: channel.unary_unary(
            "/tei.v1.Info/Info",
            request_serializer=tei_pb2.InfoRequest.SerializeToString,
            response_deserializer=tei_pb2.InfoResponse.FromString,
        )
        for name, channel in channels.items()
    }

    async def pick(table: dict[str, Any], request: Any, context: Any) -> Any:
        name = request.target.instance_name
        if name not in table:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Instance '{name}' not found")
        return table[name]

    async def embed(request: mux_pb2.EmbedRequest, context: Any) -> tei_pb2.EmbedResponse:
        backend = await pick(embeds, request, context)
        if not request.HasField("request"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing embed request")
        try:
            answer: tei_pb2.EmbedResponse = await backend(
                request.request, timeout=context.time_remaining()
            )
            return answer
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())
            raise

    async def info(request: mux_pb2.InfoRequest, context: Any) -> tei_pb2.InfoResponse:
        try:
            backend = await pick(infos, request, context)
            described: tei_pb2.InfoResponse = await backend(tei_pb2.InfoRequest())
            return described
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())
            raise

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                MUX,
                {
                    "Embed": grpc.unary_unary_rpc_method_handler(
                        embed,
                        request_deserializer=mux_pb2.EmbedRequest.FromString,
                        response_serializer=tei_pb2.EmbedResponse.SerializeToString,
                    ),
                    "Info": grpc.unary_unary_rpc_method_handler(
                        info,
                        request_deserializer=mux_pb2.InfoRequest.FromString,
                        response_serializer=tei_pb2.InfoResponse.SerializeToString,
                    ),
                },
            )
        ]
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def stdin_readable() -> None:
        if not sys.stdin.read(1):
            stop.set()

    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    await stop.wait()
    await server.stop(0.5)
    for channel in channels.values():
        await channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--route", action="append", default=[], help="NAME=HOST:PORT")
    args = parser.parse_args()
    routes = dict(item.split("=", 1) for item in args.route)
    asyncio.run(serve(args.port, routes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
