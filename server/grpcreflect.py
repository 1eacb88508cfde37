"""gRPC server reflection for the control API (grpcurl, grpcui, Postman and the like), as
grpcio-reflection serves it, with one gap filled: asked which file holds a *method*
(``grpcurl describe zds.v1.NodeAgent.AddPod``), protobuf's default (upb) pool has no answer
("Symbol not found"), where Go's and C++'s reflection answer with the service's file."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection


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


def enable(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection on ``server`` for ``service_names`` (and for itself)."""
    reflection.enable_server_reflection(
        (*service_names, reflection.SERVICE_NAME), server, pool=_MethodsToo(descriptor_pool.Default())
    )
