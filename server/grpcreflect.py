"""gRPC server reflection for the control API (grpcurl, grpcui, Postman and the like), as
grpcio-reflection serves it, with one gap filled: asked which file holds a *method*
(``grpcurl describe zds.v1.NodeAgent.AddPod``), protobuf's default (upb) pool has no answer
("Symbol not found"), where Go's and C++'s reflection answer with the service's file."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc


class _MethodsToo:
    """A descriptor pool as the reflection service reads it: the default pool's answers, and
    for a ``package.Service.Method`` it does not know, the file of that service."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            # (by name: upb's map would take "AddPod\0x" for "AddPod")
            if service is None or not any(m.name == method for m in service.methods):
                raise
            return service.file


#: The reflection service's released name (grpcio-reflection serves ``v1alpha`` only; Go's and
#: C++'s servers serve both, and clients that speak only ``v1`` exist).
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def enable(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection on ``server`` for ``service_names`` (and for itself), as ``v1alpha``
    and as ``v1``: the same messages on the wire (only the proto package differs), so the same
    servicer answers both. (Listed is ``v1alpha`` only: its descriptors are the ones loaded.)"""
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, reflection.SERVICE_NAME), pool=_MethodsToo(descriptor_pool.Default())
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": info}),)
    )
