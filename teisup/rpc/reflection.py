"""gRPC reflection (``grpc.reflection.v1alpha`` and ``v1``) on purerpc, which ships none.

Generic tools (grpcurl, grpcio-reflection's descriptor database) use it to list
a server's services and fetch their proto files. The two versions are the same
protocol in two packages: newer clients ask for v1 first, older ones (and TEI
1.8.3's own server) speak v1alpha.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import Any

from teisup.proto.grpc.reflection.v1 import reflection_grpc as v1_grpc
from teisup.proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from teisup.proto.grpc.reflection.v1alpha import reflection_grpc, reflection_pb2

__all__ = ["ReflectionService", "ReflectionServiceV1"]

# protobuf ships no type stubs; importing through importlib keeps mypy --strict
# clean whether or not types-protobuf is installed.
descriptor_pb2: Any = importlib.import_module("google.protobuf.descriptor_pb2")
descriptor_pool: Any = importlib.import_module("google.protobuf.descriptor_pool")


class ReflectionService(reflection_grpc.ServerReflectionServicer):
    """``grpc.reflection.v1alpha.ServerReflection``: list services, serve their files.

    Answers ``list_services``, ``file_by_filename`` and ``file_containing_symbol``
    from the protobuf descriptor pool the generated modules registered in;
    the rest get an UNIMPLEMENTED error response, as grpcio's server does.
    """

    _pb2: Any = reflection_pb2

    def __init__(self, service_names: list[str]) -> None:
        self._names = sorted(service_names)
        self._pool = descriptor_pool.Default()

    def _files(self, file: Any) -> list[bytes]:
        seen: set[str] = set()
        out: list[bytes] = []

        def add(fd: Any) -> None:
            if fd.name in seen:
                return
            seen.add(fd.name)
            proto = descriptor_pb2.FileDescriptorProto()
            fd.CopyToProto(proto)
            out.append(proto.SerializeToString())
            for dep in fd.dependencies:
                add(dep)

        add(file)
        return out

    def _answer(self, request: Any) -> Any:
        pb2 = self._pb2
        response = pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
        which = request.WhichOneof("message_request")
        try:
            if which == "list_services":
                response.list_services_response.service.extend(
                    pb2.ServiceResponse(name=n) for n in self._names
                )
            elif which == "file_by_filename":
                file = self._pool.FindFileByName(request.file_by_filename)
                response.file_descriptor_response.file_descriptor_proto.extend(self._files(file))
            elif which == "file_containing_symbol":
                file = self._pool.FindFileContainingSymbol(request.file_containing_symbol)
                response.file_descriptor_response.file_descriptor_proto.extend(self._files(file))
            else:
                response.error_response.error_code = 12  # UNIMPLEMENTED
                response.error_response.error_message = f"{which} is not implemented"
        except KeyError:
            response.error_response.error_code = 5  # NOT_FOUND
            response.error_response.error_message = "not found"
        return response

    async def ServerReflectionInfo(
        self, input_messages: AsyncIterator[reflection_pb2.ServerReflectionRequest]
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for request in input_messages:
            yield self._answer(request)


class ReflectionServiceV1(v1_grpc.ServerReflectionServicer):
    """``grpc.reflection.v1.ServerReflection``: `ReflectionService` in the v1 package."""

    def __init__(self, service_names: list[str]) -> None:
        self._inner = ReflectionService(service_names)
        self._inner._pb2 = v1_pb2

    async def ServerReflectionInfo(
        self, input_messages: AsyncIterator[v1_pb2.ServerReflectionRequest]
    ) -> AsyncIterator[v1_pb2.ServerReflectionResponse]:
        async for request in input_messages:
            yield self._inner._answer(request)
