"""zds.v1.NodeAgent: the gRPC control API, with reflection and grpc.health.v1.

Bad input gets a precise status and a readable message, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from zds import defaults
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.server import grpcreflect
from zds.server.agent import NodeAgent
from zds.server.bulkadd import STATUS, TooManyPods, at_most_pods, bulk_add, cut, shutting_down
from zds.server.controlwire import (
    EVENT_KIND_FROM_PROTO,
    add_pod_response,
    connection_to_proto,
    event_to_proto,
    fault_spec,
    fault_to_proto,
    pod_spec,
    pod_to_proto,
)
from zds.server.eventkinds import EventKind
from zds.server.events import FaultView, WatchEnded, WatchEnding, Watcher
from zds.server.faultkinds import FaultError, Refusal
from zds.server.faults import Fault
from zds.server.grpcdecode import RefuseUndecodable
from zds.server.names import uid_problem
from zds.server.outcomes import EnrollmentError, EnrollmentOutcome, RemovalNotRecorded
from zds.server.pods import PodSpec
from zds.server.storefile import StoreError
from zds.server.tasks import retrieve_exception

log = logging.getLogger("zds.server.control")

SERVICE_NAME = "zds.v1.NodeAgent"
#: The most event kinds a Watch may name (each at most once is enough; a few repeats pass).
WATCH_KINDS_MAX = 64


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code`` and ``details`` (cut to DETAILS_MAX bytes)."""
    await context.abort(code, cut(details))
    raise AssertionError("abort raises")  # pragma: no cover


def _removal_cut_short(agent: NodeAgent, uid: str) -> str:
    """What became of a pod whose removal the node agent's stop cut short, by its row."""
    store = agent.enrollment.store
    try:
        row = store.row(uid) if store is not None else None
    except (sqlite3.Error, StoreError):
        return "node agent shutting down; whether the pod was removed is not known (zds pod list tells)"
    if row is None:
        return "node agent shutting down; the pod is removed"
    if row.removing:
        return "node agent shutting down; the pod's removal is recorded: it ends when the node agent starts again"
    return "node agent shutting down; the pod was not removed"


def _cancelled_itself() -> None:
    """Re-raise the CancelledError being handled if the call itself is cancelled (its client
    gone, gRPC's stop); else it came from the enrollment or removal the call waited for."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class NodeAgentService(nodeagent_pb2_grpc.NodeAgentServicer):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    async def AddPod(
        self, request: nodeagent_pb2.AddPodRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.AddPodResponse:
        spec = pod_spec(request)
        if not isinstance(spec, PodSpec):
            self.agent.telemetry.enrollment(EnrollmentOutcome.INVALID.value)  # as the enrollment's own
            await _abort(context, *spec)
        try:
            enrolled = await self.agent.add_pod(spec)
        except EnrollmentError as exc:
            await _abort(context, STATUS[exc.outcome], str(exc))
        except asyncio.CancelledError:
            _cancelled_itself()  # (the client gone, gRPC's own stop)
            # The node agent's stop cut the enrollment short: whether the pod comes back, as
            # the bulk path says it.
            await _abort(context, grpc.StatusCode.UNAVAILABLE, shutting_down(self.agent, spec))
        return add_pod_response(enrolled)

    async def AddPods(
        self,
        request_iterator: AsyncIterator[nodeagent_pb2.AddPodsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[nodeagent_pb2.AddPodsReply]:
        try:
            async with contextlib.aclosing(bulk_add(self.agent, at_most_pods(request_iterator))) as replies:
                async for reply in replies:
                    yield reply
        except TooManyPods as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def RemovePod(
        self, request: nodeagent_pb2.RemovePodRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.RemovePodResponse:
        if not request.uid:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "pod uid is empty")
        try:
            pod, results = await self.agent.remove_pod(request.uid)
        except KeyError:
            if problem := uid_problem(request.uid):  # (no pod has it: nor does any ztunnel)
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            # Istio sends the delete whatever its cache holds; so does zds, and says it.
            try:
                sent = await self._release_unknown(request.uid)
            except asyncio.CancelledError:
                _cancelled_itself()
                sent = " (the node agent shut down before every ztunnel connection acked its DelWorkload)"
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"no pod with uid {request.uid} is enrolled{sent}"
            )
        except RemovalNotRecorded as exc:
            await _abort(context, grpc.StatusCode.INTERNAL, str(exc))
        except asyncio.CancelledError:
            _cancelled_itself()
            await _abort(context, grpc.StatusCode.UNAVAILABLE, _removal_cut_short(self.agent, request.uid))
        return nodeagent_pb2.RemovePodResponse(
            pod=pod_to_proto(pod),
            deliveries=[
                nodeagent_pb2.DeleteDelivery(connection_id=r.conn_id, error=r.error) for r in results
            ],
        )

    async def _release_unknown(self, uid: str) -> str:
        try:
            results = await self.agent.release_unknown(uid)
        except ValueError:  # enrolled meanwhile: that enrollment stands
            return ""
        if not results:
            return ""
        said = f"DelWorkload sent to {len(results)} ztunnel connection(s) anyway, as Istio does"
        if unacked := [r.error for r in results if r.error]:
            said += f"; not acked by {len(unacked)}: {unacked[0]}"
        return f" ({said})"

    async def ListPods(
        self, request: nodeagent_pb2.ListPodsRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.ListPodsResponse:
        return nodeagent_pb2.ListPodsResponse(pods=[pod_to_proto(p) for p in self.agent.pods.listing()])

    async def ListConnections(
        self, request: nodeagent_pb2.ListConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.ListConnectionsResponse:
        return nodeagent_pb2.ListConnectionsResponse(
            connections=[connection_to_proto(c) for c in self.agent.connection_infos()]
        )

    async def InjectFault(
        self, request: nodeagent_pb2.InjectFaultRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.InjectFaultResponse:
        try:
            spec = fault_spec(request)
        except FaultError as exc:
            self.agent.telemetry.fault("unknown", "refused")
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            fault = self.agent.inject_fault(spec)  # counts its own refusals
        except FaultError as exc:
            status = (
                grpc.StatusCode.INVALID_ARGUMENT
                if exc.refusal is Refusal.INVALID
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            await _abort(context, status, str(exc))
        if request.wait:
            await _wait_applied(fault, context)
        return nodeagent_pb2.InjectFaultResponse(fault=fault_to_proto(FaultView.of(fault)))

    async def ListFaults(
        self, request: nodeagent_pb2.ListFaultsRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.ListFaultsResponse:
        armed = self.agent.fault_book.armed()
        return nodeagent_pb2.ListFaultsResponse(faults=[fault_to_proto(FaultView.of(f)) for f in armed])

    async def ClearFaults(
        self, request: nodeagent_pb2.ClearFaultsRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.ClearFaultsResponse:
        try:
            cleared = self.agent.fault_book.clear(request.id)
        except FaultError as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        return nodeagent_pb2.ClearFaultsResponse(cleared=[fault_to_proto(FaultView.of(f)) for f in cleared])

    async def Watch(self, request: nodeagent_pb2.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        # (checked before anything is kept: a watcher held a 4 MB uid, or went through
        # millions of kinds on the event loop, for each stream a client opened)
        if request.uid and (problem := uid_problem(request.uid)):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"cannot watch: {problem}")
            return
        if len(request.kinds) > WATCH_KINDS_MAX:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot watch {len(request.kinds)} event kinds: at most {WATCH_KINDS_MAX} (there are "
                f"{len(EventKind) - 1})",
            )
            return
        kinds = {EVENT_KIND_FROM_PROTO.get(value) for value in request.kinds}
        if None in kinds or EventKind.CURRENT_STATE_END in kinds:
            wanted = ", ".join(
                f"EVENT_KIND_{k.name}" for k in EventKind if k is not EventKind.CURRENT_STATE_END
            )
            bad = ", ".join(
                str(v)
                for v in sorted(set(request.kinds))
                if EVENT_KIND_FROM_PROTO.get(v) in (None, EventKind.CURRENT_STATE_END)
            )
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot watch event kind {bad}; expected one of {wanted}",
            )
            return
        watcher = self.agent.watch(frozenset(k for k in kinds if k is not None) or None, request.uid)
        try:
            await self._watch(watcher, context)
        except _ClientGone:
            pass
        finally:
            watcher.close()

    @staticmethod
    async def _watch(watcher: Watcher, context: grpc.aio.ServicerContext) -> None:
        while True:
            try:
                event = await watcher.next()
            except WatchEnded as ended:
                await _abort(context, _WATCH_STATUS[ended.reason], ended.detail)
            if not await _write(context, event_to_proto(event), watcher):
                end = watcher.end
                assert end is not None
                try:
                    await _abort(context, _WATCH_STATUS[end.reason], end.detail)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # gRPC still holds the abandoned write: no status can follow it
                    log.debug("watcher's stream ended without its status (%s): %r", end.detail, exc)
                return


#: How long InjectFault with wait=true waits for its fault to take effect.
FAULT_WAIT = 60.0


async def _wait_applied(fault: Fault, context: grpc.aio.ServicerContext) -> None:
    try:
        async with asyncio.timeout(FAULT_WAIT):
            await fault.done.wait()
    except TimeoutError:
        await _abort(
            context,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"fault {fault.id} ({fault.kind.label}) did not take effect within {FAULT_WAIT:g}s; it stays armed",
        )


_WATCH_STATUS = {
    WatchEnding.FELL_BEHIND: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WatchEnding.SHUTDOWN: grpc.StatusCode.UNAVAILABLE,
    WatchEnding.TOO_MANY: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


async def _write(context: grpc.aio.ServicerContext, message: nodeagent_pb2.Event, watcher: Watcher) -> bool:
    """Write one event; False when the watcher fell behind while the write was stuck.

    A client that does not read leaves the write waiting on HTTP/2 flow control;
    the node agent does not wait with it: when the watcher's queue overflows
    meanwhile, the write is abandoned and the stream ended.
    """
    if watcher.fell_behind.is_set():
        return False
    write = asyncio.ensure_future(context.write(message))
    write.add_done_callback(retrieve_exception)  # a client gone mid-write: its error is this call's end
    fell_behind = asyncio.ensure_future(watcher.fell_behind.wait())
    try:
        await asyncio.wait({write, fell_behind}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        fell_behind.cancel()
        if not write.done():
            write.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await write
    if write.cancelled():
        return False
    if (failed := write.exception()) is not None:  # the client went away: nobody to tell
        raise _ClientGone from failed
    return True


class _ClientGone(Exception):
    """A watcher's client went away mid-write (its stream is over; nothing to log)."""


@dataclass(frozen=True)
class TlsFiles:
    """The control API's TLS on TCP: its certificate and key (PEM, read once at start); with
    ``client_ca``, clients must present a certificate that CA signed (mutual TLS)."""

    cert: bytes
    key: bytes = field(repr=False)  # (never in a log line or a traceback)
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=ca, require_client_auth=ca is not None
        )


class ControlServers:
    """The control API's gRPC servers: the control socket's (behind its door) and, with
    --grpc-listen, the TCP one, with a bound of its own on the connections it holds."""

    def __init__(self, servers: list[grpc.aio.Server]) -> None:
        self.servers = servers

    async def stop(self, grace: float | None) -> None:
        """Stop them together; one that fails to is said, and the others stop all the same."""
        for failed in await asyncio.gather(
            *(server.stop(grace) for server in self.servers), return_exceptions=True
        ):
            if failed is not None:
                log.error("control API: a gRPC server failed to stop: %r", failed)


async def start_control_server(
    agent: NodeAgent, unix_path: str, tcp: str | None = None, tls: TlsFiles | None = None
) -> tuple[ControlServers, int | None]:
    """Serve the control API on ``unix_path`` and, if given, on TCP ``tcp`` (with ``tls``,
    or plaintext when None: the caller decided that was asked for); the servers, and the
    TCP port (the one picked for port 0)."""
    service = NodeAgentService(agent)
    health_servicer = health.aio.HealthServicer()
    unix_server = _grpc_server(service, health_servicer)
    servers = ControlServers([unix_server])
    if unix_server.add_insecure_port(f"unix:{unix_path}") == 0:
        raise OSError(f"cannot listen for gRPC on unix:{unix_path}")
    bound: int | None = None
    if tcp is not None:
        tcp_server = _grpc_server(
            service,
            health_servicer,
            [("grpc.max_allowed_incoming_connections", defaults.CONTROL_TCP_CONNECTIONS)],
        )
        servers.servers.append(tcp_server)
        bound = (
            tcp_server.add_secure_port(tcp, tls.credentials()) if tls else tcp_server.add_insecure_port(tcp)
        )
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {tcp}")
    for server in servers.servers:
        await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return servers, bound


def _grpc_server(
    service: NodeAgentService,
    health_servicer: health.aio.HealthServicer,
    options: list[tuple[str, int]] | None = None,
) -> grpc.aio.Server:
    """A gRPC server of the control API (the node agent's service, health, reflection)."""
    server = grpc.aio.server(
        interceptors=[RefuseUndecodable()],
        options=[
            # A connection that has not finished gRPC's handshake is closed after this long
            # (gRPC's default is 120 s): the control socket's door lets through only what
            # speaks first; one with no call under way after CONTROL_IDLE.
            ("grpc.server_handshake_timeout_ms", int(defaults.CONTROL_OPENING_TIMEOUT * 1000)),
            ("grpc.max_connection_idle_ms", int(defaults.CONTROL_IDLE * 1000)),
            # (gRPC's default is 4 MiB: a message of empty pods decodes to ~60 times that)
            ("grpc.max_receive_message_length", defaults.CONTROL_MAX_REQUEST),
            *(options or []),
        ],
    )
    nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpcreflect.enable(
        server,
        (
            nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ),
    )
    return server
