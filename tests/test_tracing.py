"""Traces: the node agent in this process with an in-memory span exporter and a
raw-socket ztunnel stand-in in a thread; then a real `zds server` exporting
through the OTEL_* environment variables (console, OTLP over gRPC and HTTP)."""

from __future__ import annotations

import asyncio
import http.server
import importlib
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.harness import (
    NodeAgentProc,
    async_wait_until,
    pod_netns,
    run_all,
    serve_agent,
    stop_served_agent,
    wait_until,
)
from tests.standins import AckingPeer, RawPeer
from zds.gen import nodeagent_pb2
from zds.netns import NetnsRef
from zds.netns.fixtures import create_netns, delete_netns
from zds.server import spans
from zds.server.agent import AgentConfig, NodeAgent
from zds.server.otelenv import TelemetryConfigError
from zds.server.outcomes import EnrollmentError
from zds.server.pods import PodSpec
from zds.server.redirect import Redirector
from zds.server.telemetry import Telemetry

pytestmark = pytest.mark.root


@dataclass
class InProcess:
    agent: NodeAgent
    zds_socket: str
    exporter: InMemorySpanExporter
    peers: list[AckingPeer]

    async def connect(self, nack: dict[str, str] | None = None) -> AckingPeer:
        count = len(self.agent.connections)
        peer = AckingPeer(self.zds_socket, nack)
        self.peers.append(peer)
        await async_wait_until(
            lambda: len(self.agent.connections) > count and self.agent.connections[-1].snapshot_complete,
            "the snapshot to be acked",
        )
        return peer

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def start_agent(tmp_path: object, redirector: Redirector | None = None) -> tuple[NodeAgent, Any, str]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(span_processors=[SimpleSpanProcessor(exporter)])
    agent = NodeAgent(AgentConfig(keepalive_interval=0.2), redirector, telemetry)
    path = os.path.join(str(tmp_path), "ztunnel.sock")
    return agent, exporter, path


@pytest.fixture
async def env(tmp_path: object) -> AsyncIterator[InProcess]:
    agent, exporter, path = start_agent(tmp_path)
    listener, task = serve_agent(agent, path)
    env = InProcess(agent, path, exporter, [])
    try:
        yield env
    finally:
        await stop_served_agent(agent, task, listener, env.peers)


def spec(uid: str, netns: str | None = None) -> PodSpec:
    ref = NetnsRef.of_path(netns or pod_netns())
    return PodSpec.create(uid, ref, name=f"pod-{uid}", namespace="shop", service_account="sa")


def roots(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name and s.parent is None]


def children(found: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    kids = [s for s in found if s.parent is not None and s.parent.span_id == parent.context.span_id]
    return sorted(kids, key=lambda s: s.start_time or 0)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- in-process, in-memory exporter -------------------------------------------------------


async def test_an_acked_enrollment_is_one_trace_open_send_wait(env: InProcess) -> None:
    await env.connect()
    conn = env.agent.connections[0]
    env.exporter.clear()
    await env.agent.add_pod(spec("u1"))

    found = env.spans()
    [root] = roots(found, spans.ENROLL_POD)
    assert attrs(root) == {
        spans.POD_UID: "u1",
        spans.POD_NAME: "pod-u1",
        spans.POD_NAMESPACE: "shop",
        spans.CONNECTION_ID: conn.id,
        spans.ACK_ERROR: "",
        spans.OUTCOME: "acked",
    }
    assert root.status.status_code is not StatusCode.ERROR
    kids = children(found, root)
    assert [s.name for s in kids] == [spans.OPEN_NETNS, spans.SEND, spans.WAIT_ACK]
    assert all(s.context.trace_id == root.context.trace_id for s in kids)
    opened, send, wait = kids
    assert attrs(opened)[spans.NETNS_PATH] == pod_netns()
    assert attrs(opened)[spans.NETNS_INODE] == os.stat(pod_netns()).st_ino
    assert attrs(send) == {spans.CONNECTION_ID: conn.id, spans.MESSAGE_TYPE: "add", spans.POD_UID: "u1"}
    assert attrs(wait)[spans.ACK_ERROR] == "" and attrs(wait)[spans.CONNECTION_ID] == conn.id
    assert wait.start_time is not None and send.end_time is not None and wait.start_time >= send.end_time
    assert root.end_time is not None and wait.end_time is not None and root.end_time >= wait.end_time
    assert len(found) == 4  # nothing else was traced


async def test_a_nack_marks_the_wait_and_the_enrollment_as_errors(env: InProcess) -> None:
    await env.connect(nack={"u1": "failure to start proxy : port taken"})
    env.exporter.clear()
    with pytest.raises(EnrollmentError):
        await env.agent.add_pod(spec("u1"))
    found = env.spans()
    [root] = roots(found, spans.ENROLL_POD)
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == "failure to start proxy : port taken"
    assert attrs(root)[spans.ACK_ERROR] == "failure to start proxy : port taken"
    assert attrs(root)[spans.OUTCOME] == "nacked"
    wait = children(found, root)[-1]
    assert wait.name == spans.WAIT_ACK and wait.status.status_code is StatusCode.ERROR
    assert attrs(wait)[spans.ACK_ERROR] == "failure to start proxy : port taken"


async def test_without_a_connection_the_trace_ends_after_opening_the_netns(env: InProcess) -> None:
    with pytest.raises(EnrollmentError):
        await env.agent.add_pod(spec("u1"))
    found = env.spans()
    [root] = roots(found, spans.ENROLL_POD)
    assert attrs(root)[spans.OUTCOME] == "no_connection" and spans.CONNECTION_ID not in attrs(root)
    assert root.status.status_code is StatusCode.ERROR and "no ztunnel connection" in str(
        root.status.description
    )
    assert [s.name for s in children(found, root)] == [spans.OPEN_NETNS]


async def test_a_bad_netns_fails_the_open_netns_span(env: InProcess) -> None:
    with pytest.raises(EnrollmentError):
        await env.agent.add_pod(spec("u1", "/var/run/netns/zds-absent"))
    found = env.spans()
    [root] = roots(found, spans.ENROLL_POD)
    [opened] = children(found, root)
    assert opened.name == spans.OPEN_NETNS and opened.status.status_code is StatusCode.ERROR
    assert attrs(root)[spans.OUTCOME] == "invalid"


async def test_each_enrollment_is_its_own_trace(env: InProcess) -> None:
    await env.connect()
    await env.agent.add_pod(spec("u1"))
    await env.agent.add_pod(spec("u2"))
    found = env.spans()
    enrollments = roots(found, spans.ENROLL_POD)
    assert [attrs(s)[spans.POD_UID] for s in enrollments] == ["u1", "u2"]
    assert enrollments[0].context.trace_id != enrollments[1].context.trace_id


async def test_a_removal_traces_the_delete_sent_to_every_connection(env: InProcess) -> None:
    await env.connect()
    await env.connect()
    await env.agent.add_pod(spec("u1"))
    env.exporter.clear()
    await env.agent.remove_pod("u1")
    found = env.spans()
    [root] = roots(found, spans.REMOVE_POD)
    assert attrs(root)[spans.POD_UID] == "u1"
    kids = children(found, root)
    assert sorted(s.name for s in kids) == [spans.SEND, spans.SEND, spans.WAIT_ACK, spans.WAIT_ACK]
    assert {attrs(s)[spans.CONNECTION_ID] for s in kids} == {c.id for c in env.agent.connections}
    assert {attrs(s)[spans.MESSAGE_TYPE] for s in kids} == {"del"}


async def test_a_snapshot_is_one_trace_with_each_entry(env: InProcess) -> None:
    await env.agent.load(spec("u1"))
    await env.agent.load(spec("u2", "/var/run/netns/zds-absent"))  # known without a netns: KeepWorkload
    env.exporter.clear()
    await env.connect()
    found = env.spans()
    [root] = roots(found, spans.SNAPSHOT)
    assert attrs(root) == {spans.CONNECTION_ID: env.agent.connections[0].id, spans.SNAPSHOT_PODS: 2}
    sends = [s for s in children(found, root) if s.name == spans.SEND]
    assert sorted((attrs(s)[spans.MESSAGE_TYPE], attrs(s).get(spans.POD_UID)) for s in sends) == [
        ("add", "u1"),
        ("keep", "u2"),
        ("snapshot_sent", None),
    ]


async def test_an_ack_timeout_fails_the_wait(tmp_path: object) -> None:
    agent, exporter, path = start_agent(tmp_path)
    agent.config.ack_timeout = 0.3
    listener, task = serve_agent(agent, path)
    peer = RawPeer(path)
    try:
        peer.hello()
        assert (await asyncio.to_thread(peer.expect)).payload == bytes.fromhex("1a00")  # SnapshotSent
        peer.ack()
        await async_wait_until(lambda: agent.connections[0].snapshot_complete, "snapshot")
        with pytest.raises(EnrollmentError):
            await agent.add_pod(spec("u1"))  # never acked
        found = list(exporter.get_finished_spans())
        [root] = roots(found, spans.ENROLL_POD)
        assert attrs(root)[spans.OUTCOME] == "timeout"
        wait = children(found, root)[-1]
        assert wait.name == spans.WAIT_ACK and wait.status.status_code is StatusCode.ERROR
        assert "no ack" in str(wait.status.description)
    finally:
        await stop_served_agent(agent, task, listener, [peer])


async def test_installing_and_removing_rules_are_spans(tmp_path: object) -> None:
    name = f"zds-trace-{secrets.token_hex(3)}"
    netns = create_netns(name)
    agent, exporter, path = start_agent(tmp_path, Redirector())
    listener, task = serve_agent(agent, path)
    env = InProcess(agent, path, exporter, [])
    try:
        await env.connect()
        await agent.add_pod(spec("u1", netns))
        [root] = roots(env.spans(), spans.ENROLL_POD)
        assert [s.name for s in children(env.spans(), root)] == [
            spans.OPEN_NETNS,
            spans.INSTALL_RULES,
            spans.SEND,
            spans.WAIT_ACK,
        ]
        await agent.remove_pod("u1")
        [removal] = roots(env.spans(), spans.REMOVE_POD)
        # Rules out first, then DelWorkload (Istio's RemovePodFromMesh order).
        names = [s.name for s in children(env.spans(), removal)]
        assert names[:2] == [spans.REMOVE_RULES, spans.SEND], names
    finally:
        await stop_served_agent(agent, task, listener, env.peers)
        delete_netns(name, missing_ok=True)


# -- exporters from OTEL_* ------------------------------------------------------------------


def test_exporters_come_from_the_otel_environment_variables() -> None:
    assert not Telemetry.from_environment({}).tracing  # default: none
    assert not Telemetry.from_environment({"OTEL_TRACES_EXPORTER": "none"}).tracing
    assert Telemetry.from_environment({"OTEL_TRACES_EXPORTER": "console"}).tracing
    assert Telemetry.from_environment({"OTEL_TRACES_EXPORTER": "otlp"}).tracing
    assert not Telemetry.from_environment(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    ).tracing
    with pytest.raises(TelemetryConfigError, match="unknown exporter 'zipkin'"):
        Telemetry.from_environment({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TelemetryConfigError, match="http/json"):
        Telemetry.from_environment(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )


def test_a_bad_otel_setting_stops_the_server_with_a_clear_message(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    server = NodeAgentProc(str(tmp_path))
    try:
        assert server.proc.wait(30) == 1
        assert (
            "cannot set up OpenTelemetry: OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'" in server.output()
        )
    finally:
        server.stop()


@pytest.fixture
def run_server(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., NodeAgentProc]]:
    started: list[NodeAgentProc] = []
    peers: list[AckingPeer] = []

    def start(nack: dict[str, str] | None = None, **environ: str) -> NodeAgentProc:
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        server = NodeAgentProc(str(tmp_path))
        started.append(server)
        server.wait_ready()
        peers.append(AckingPeer(server.zds_socket, nack))
        wait_until(lambda: "snapshot sent to ztunnel" in server.output(), what="the snapshot")
        return server

    yield start
    run_all([*(peer.close for peer in peers), *(server.stop for server in started)], "peers and node agents")


def test_console_exporter_prints_the_enrollment_trace(run_server: Callable[..., NodeAgentProc]) -> None:
    server = run_server(OTEL_TRACES_EXPORTER="console")
    server.add_pod("u1", pod_netns())
    wait_until(lambda: '"name": "zds.enroll_pod"' in server.output(), what="the root span printed")
    # Spans go to stdout as they end; log lines reach stderr in batches (within milliseconds).
    wait_until(lambda: "pod enrolled (netns" in server.output(), what="the enrollment's log line")
    out = server.output()
    for name in (spans.OPEN_NETNS, spans.SEND, spans.WAIT_ACK):
        assert f'"name": "{name}"' in out
    assert '"k8s.pod.uid": "u1"' in out
    assert "tracing=on" in out
    # the log line about it names the trace it belongs to
    assert f'"trace_id": "0x{trace_of_line(out, "pod enrolled (netns")}"' in out


def test_a_nacks_log_line_names_the_enrollments_trace(run_server: Callable[..., NodeAgentProc]) -> None:
    """The line is written when the ack is reported (once the next request is on its way, or by
    the connection's reader): it carried no trace, though the timeout's line did."""
    server = run_server(
        nack={"u-nacked": "failure to start proxy : port taken"}, OTEL_TRACES_EXPORTER="console"
    )
    with pytest.raises(grpc.RpcError):
        server.add_pod("u-nacked", pod_netns())
    wait_until(lambda: "ztunnel nacked add" in server.output(), what="the nack's log line")
    wait_until(lambda: '"name": "zds.enroll_pod"' in server.output(), what="the root span printed")
    out = server.output()
    assert f'"trace_id": "0x{trace_of_line(out, "ztunnel nacked add")}"' in out  # the enrollment's trace


def test_the_removals_log_line_names_the_removals_trace(run_server: Callable[..., NodeAgentProc]) -> None:
    server = run_server(OTEL_TRACES_EXPORTER="console")
    server.add_pod("u1", pod_netns())
    server.remove_pod("u1")
    wait_until(lambda: '"name": "zds.remove_pod"' in server.output(), what="the removal's span printed")
    wait_until(lambda: "pod removed" in server.output(), what="the removal's log line")
    out = server.output()
    span = re.search(r'"name": "zds.remove_pod",\s*"context": \{\s*"trace_id": "0x([0-9a-f]{32})"', out)
    assert span is not None, out
    assert span.group(1) == trace_of_line(out, "pod removed")


def trace_of_line(out: str, marker: str) -> str:
    """The ``trace_id`` of the one log line in ``out`` that holds ``marker``."""
    [line] = [x for x in out.splitlines() if marker in x]
    trace_id = re.search(r"trace_id=([0-9a-f]{32})", line)
    assert trace_id is not None, line
    return trace_id.group(1)


class Collector:
    """A stand-in OpenTelemetry collector: OTLP/gRPC or OTLP/HTTP, keeping what it receives."""

    def __init__(self, protocol: str) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.requests: list[Any] = []
        received = self.requests
        self._grpc: grpc.Server | None = None
        self._http: http.server.HTTPServer | None = None
        if protocol == "grpc":

            class Service(trace_service_pb2_grpc.TraceServiceServicer):
                def Export(self, request: Any, context: Any) -> Any:
                    received.append(request)
                    return trace_service_pb2.ExportTraceServiceResponse()

            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._grpc)  # type: ignore[no-untyped-call]  # generated without annotations
            self.port = self._grpc.add_insecure_port("127.0.0.1:0")
            self._grpc.start()
        else:

            class Handler(http.server.BaseHTTPRequestHandler):
                def do_POST(self) -> None:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    if self.path == "/v1/traces":
                        received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.end_headers()
                    self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

                def log_message(self, *args: Any) -> None:
                    pass

            self._http = http.server.HTTPServer(("127.0.0.1", 0), Handler)
            self.port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        """(span name, resource attributes, span attributes) of everything received."""
        out = []
        for request in list(self.requests):
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        values = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                        out.append((span.name, resource, values))
        return out

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_exporter_sends_the_trace_to_a_collector(
    run_server: Callable[..., NodeAgentProc], protocol: str
) -> None:
    # The exporter of this protocol (a dev dependency, in the otlp extra): missing, the test fails.
    importlib.import_module(
        {
            "grpc": "opentelemetry.exporter.otlp.proto.grpc",
            "http/protobuf": "opentelemetry.exporter.otlp.proto.http",
        }[protocol]
    )
    collector = Collector(protocol)
    try:
        server = run_server(
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_BSP_SCHEDULE_DELAY="50",
            OTEL_SERVICE_NAME="node-agent-under-test",
        )
        server.add_pod("u1", pod_netns(), name="web", namespace="shop")
        wait_until(
            lambda: any(name == spans.ENROLL_POD for name, _, _ in collector.spans()),
            what="the enrollment trace at the collector",
        )
        received = collector.spans()
        [(_, resource, root)] = [s for s in received if s[0] == spans.ENROLL_POD]
        assert resource["service.name"] == "node-agent-under-test"
        assert root[spans.POD_UID] == "u1" and root[spans.POD_NAME] == "web"
        assert root[spans.POD_NAMESPACE] == "shop"
        names = {name for name, _, _ in received}
        assert {spans.OPEN_NETNS, spans.SEND, spans.WAIT_ACK, spans.SNAPSHOT} <= names
    finally:
        collector.close()


def only_these_otel_variables(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """The environment's OTEL_* variables are ``env``'s (where the SDK reads them itself)."""
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_QUEUE_SIZE": "-1"},
    ],
)
def test_an_otel_value_the_sdk_refuses_is_a_config_error_naming_the_settings(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's own ValueError (it reads its values from the environment) was a traceback at start."""
    only_these_otel_variables(monkeypatch, env)
    with pytest.raises(TelemetryConfigError) as refused:
        Telemetry.from_environment()
    assert str(refused.value).endswith(f"; set here: {', '.join(sorted(env))}")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"OTEL_SERVICE_NAME": ""}, "zds-node-agent"),  # (the SDK ignores it: "unknown_service:python")
        ({"OTEL_SERVICE_NAME": " "}, " "),  # (taken as the SDK takes it)
        ({"OTEL_RESOURCE_ATTRIBUTES": "a=b,service.name="}, "zds-node-agent"),
        ({"OTEL_SERVICE_NAME": "agent-7"}, "agent-7"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "a=b, service.name = agent-8"}, "agent-8"),
    ],
)
def test_an_empty_service_name_leaves_zds_own_and_any_other_is_taken(
    env: dict[str, str], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_these_otel_variables(monkeypatch, env)
    text = Telemetry.from_environment().prometheus()[0].decode()
    assert re.search(r'^target_info\{.*\bservice_name="([^"]*)"', text, re.M)[1] == name  # type: ignore[index]


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_SERVICE_NAME": os.fsdecode(b"agent-\xff")},
        {"OTEL_RESOURCE_ATTRIBUTES": os.fsdecode(b"service.name=agent-\xff")},
        {"OTEL_SERVICE_NAME": "agent\n7"},
    ],
)
def test_a_resource_that_is_not_printable_text_is_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes that are not UTF-8 went into every /metrics page (target_info): each scrape a 500
    (prometheus_client could not encode it), the start said nothing."""
    only_these_otel_variables(monkeypatch, env)
    with pytest.raises(TelemetryConfigError) as refused:
        Telemetry.from_environment()
    assert str(refused.value) == f"{next(iter(env))}: give printable UTF-8 text"


@pytest.mark.parametrize("interval", ["1e13", "0", "-5", "inf", "nan", "abc"])
def test_a_metric_export_interval_no_exporter_can_keep_is_refused(
    interval: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1e13 ms killed the exporter's thread at its first wait (over threading.TIMEOUT_MAX); an
    infinite one (or NaN) exported nothing at all; one the SDK could not read became a minute,
    with a warning (0 and negative ones the SDK refused itself)."""
    only_these_otel_variables(
        monkeypatch, {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": interval}
    )
    with pytest.raises(TelemetryConfigError) as refused:
        Telemetry.from_environment()
    assert str(refused.value) == (
        f"OTEL_METRIC_EXPORT_INTERVAL={interval!r}: give the milliseconds between metric exports "
        "(a number over 0, at most 9.22e+12)"
    )
    for taken in ("60000", ""):  # ("": unset, as the OpenTelemetry spec has every variable)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", taken)
        asyncio.run(Telemetry.from_environment().shutdown())
    # Without a metric exporter the value is read by nothing: not refused.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", interval)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER")
    asyncio.run(Telemetry.from_environment().shutdown())


@pytest.mark.parametrize("timeout", ["nan", "-1", "0", "inf", "1e10", "abc"])
@pytest.mark.parametrize(
    ("exporter", "variable", "protocol"),
    [
        ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TIMEOUT", "grpc"),
        ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "http/protobuf"),
        ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_TIMEOUT", "http/protobuf"),
        ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "grpc"),
    ],
)
def test_an_otlp_timeout_no_export_can_keep_is_refused(
    timeout: str, exporter: str, variable: str, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK takes any float (in seconds, where the OpenTelemetry spec says milliseconds): NaN
    made each gRPC export retry for ~30 s against a deadline it never met, and failed each HTTP
    one; -1 and 0 failed each export at once, as one far off (10**10 s, inf: gRPC's
    DEADLINE_EXCEEDED at once); one it could not read was a ValueError (gRPC) or 10 s (HTTP)."""
    env = {exporter: "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, variable: timeout}
    only_these_otel_variables(monkeypatch, env)
    with pytest.raises(TelemetryConfigError) as refused:
        Telemetry.from_environment()
    assert str(refused.value) == (
        f"{variable}={timeout!r}: give the seconds an OTLP export may take (a number over 0, at most "
        "86400, a day)"
    )
    monkeypatch.setenv(variable, "0.5")  # (taken; the stop's last export fails within it: no collector)
    asyncio.run(Telemetry.from_environment().shutdown())


def test_a_collector_that_never_answers_holds_the_exit_at_most_the_shutdown_wait(
    run_server: Callable[..., NodeAgentProc],
) -> None:
    """A collector that accepts and never answers held SIGTERM's exit for 20 s (each provider
    the exporter's timeout, then again at exit). The flush now has SHUTDOWN_WAIT; what it
    could not send is dropped in a warning line, and the exit is the clean one."""
    import socket

    from zds.server.telemetry import SHUTDOWN_WAIT

    with socket.socket() as blackhole:  # connections complete in its backlog; nothing is read
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        server = run_server(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
        server.add_pod("u1", pod_netns())  # spans to flush
        assert server.stop() == 0  # (not killed: stop() kills what has not exited within 15 s)
    assert f"OpenTelemetry exporters still flushing after {SHUTDOWN_WAIT:g}s" in server.output()


def test_console_spans_never_hold_the_loop_on_a_stdout_nobody_reads(tmp_path: Any) -> None:
    """The console exporter wrote each span on the event loop as it ended: with stdout a pipe
    nobody read (a terminal paused, a log shipper stuck), its 64 KiB filled after a few
    pods and every enrollment waited, and the stop too (SIGTERM was never taken). Now written
    by its batch's thread: spans wait there (dropped past its queue), the loop goes on."""
    fifo = os.path.join(str(tmp_path), "stdout")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # (there, never reading)
    server = NodeAgentProc(
        str(tmp_path), env={"OTEL_TRACES_EXPORTER": "console"}, wrapper=["sh", "-c", 'exec "$@" >"$0"', fifo]
    ).wait_ready()
    peer = AckingPeer(server.zds_socket)
    try:
        netns = pod_netns()
        with server.control() as stub:
            for i in range(200):  # (~4 spans a pod, ~1 KiB each)
                request = nodeagent_pb2.AddPodRequest(uid=f"u{i}", netns_path=netns)
                stub.AddPod(request, timeout=10)
        assert len(server.list_pods()) == 200
    finally:
        run_all([peer.close, lambda: assert_stopped(server)], "the peer and the node agent")
        os.close(reader)


def assert_stopped(server: NodeAgentProc) -> None:
    assert server.stop() == 0  # (stop() kills one that has not exited within 15 s: not 0 then)
