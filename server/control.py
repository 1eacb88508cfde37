"""zds.v1.NodeAgent: the gRPC control API, with reflection and grpc.health.v1.

Bad input gets a precise status and a readable message, never a traceback.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.server.agent import EnrollmentError, NodeAgent
from zds.server.pods import Pod, PodSpec, PodState

log = logging.getLogger("zds.server.control")

SERVICE_NAME = "zds.v1.NodeAgent"

_STATE = {
    PodState.PENDING: nodeagent_pb2.POD_STATE_PENDING,
    PodState.ACKED: nodeagent_pb2.POD_STATE_ACKED,
    PodState.FAILED: nodeagent_pb2.POD_STATE_FAILED,
}

_STATUS = {
    EnrollmentError.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    EnrollmentError.NO_CONNECTION: grpc.StatusCode.UNAVAILABLE,
    EnrollmentError.NACKED: grpc.StatusCode.FAILED_PRECONDITION,
    EnrollmentError.LOST: grpc.StatusCode.UNAVAILABLE,
    EnrollmentError.RULES: grpc.StatusCode.INTERNAL,
}


def pod_to_proto(pod: Pod) -> nodeagent_pb2.Pod:
    msg = nodeagent_pb2.Pod(
        uid=pod.spec.uid,
        name=pod.spec.name,
        namespace=pod.spec.namespace,
        service_account=pod.spec.service_account,
        netns_path=pod.netns.path if pod.netns is not None else pod.spec.netns,
        state=_STATE[pod.state],
        last_error=pod.last_error,
        rules_installed=pod.rules_installed,
    )
    if pod.netns is not None:
        msg.netns.dev = pod.netns.identity.dev
        msg.netns.ino = pod.netns.identity.ino
    ts = Timestamp()
    ts.FromNanoseconds(int(pod.enrolled_at * 1e9))
    msg.enrolled_at.CopyFrom(ts)
    return msg


class NodeAgentService(nodeagent_pb2_grpc.NodeAgentServicer):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    async def AddPod(
        self, request: nodeagent_pb2.AddPodRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.AddPodResponse:
        which = request.WhichOneof("netns")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "netns_path or netns_pid is required")
        if which == "netns_pid" and request.netns_pid <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"netns_pid {request.netns_pid} is not a pid"
            )
        netns = request.netns_path if which == "netns_path" else f"pid:{request.netns_pid}"
        spec = PodSpec(
            uid=request.uid,
            name=request.name,
            namespace=request.namespace,
            service_account=request.service_account or "default",
            netns=netns,
        )
        try:
            enrolled = await self.agent.add_pod(spec)
        except EnrollmentError as exc:
            await context.abort(_STATUS[exc.kind], str(exc))
        return nodeagent_pb2.AddPodResponse(pod=pod_to_proto(enrolled.pod), connection_id=enrolled.conn_id)

    async def RemovePod(
        self, request: nodeagent_pb2.RemovePodRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.RemovePodResponse:
        if not request.uid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "pod uid is empty")
        try:
            pod, results = await self.agent.remove_pod(request.uid)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no pod with uid {request.uid} is enrolled")
        return nodeagent_pb2.RemovePodResponse(
            pod=pod_to_proto(pod),
            deliveries=[
                nodeagent_pb2.DeleteDelivery(connection_id=r.conn_id, error=r.error) for r in results
            ],
        )

    async def ListPods(
        self, request: nodeagent_pb2.ListPodsRequest, context: grpc.aio.ServicerContext
    ) -> nodeagent_pb2.ListPodsResponse:
        pods = sorted(self.agent.pods.values(), key=lambda p: (p.spec.namespace, p.spec.name, p.uid))
        return nodeagent_pb2.ListPodsResponse(pods=[pod_to_proto(p) for p in pods])


async def start_control_server(agent: NodeAgent, addresses: list[str]) -> grpc.aio.Server:
    """Serve the control API on each address (``unix:PATH`` or ``HOST:PORT``)."""
    server = grpc.aio.server()
    nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(NodeAgentService(agent), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    for address in addresses:
        if server.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server
