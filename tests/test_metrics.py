"""/metrics of a real `zds server`, scraped over HTTP and parsed with
prometheus_client's own text (and OpenMetrics) parsers, while ztunnel
stand-ins connect, ack, nack and go away."""

from __future__ import annotations

import functools
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    WAYS_OF_WAITING,
    NodeAgentProc,
    check_half_requests_bounded,
    check_places_not_held,
    pod_netns,
    post_unix,
    wait_until,
)
from tests.standins import Peers, RawPeer
from zds.gen import nodeagent_pb2
from zds.server.outcomes import EnrollmentOutcome

pytestmark = pytest.mark.root

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Server(NodeAgentProc):
    def __init__(self, tmp: str, *extra: str) -> None:
        super().__init__(tmp, "--http-listen", "127.0.0.1:0", "--keepalive-interval", "0.2", *extra)

    @functools.cached_property
    def http(self) -> str:
        """Where its HTTP endpoints listen (the port the kernel picked: none taken meanwhile)."""
        return self.http_address()

    def get(self, path: str, accept: str = "") -> tuple[str, str]:
        req = urllib.request.Request(
            f"http://{self.http}{path}", headers={"Accept": accept} if accept else {}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read().decode(), resp.headers["Content-Type"]

    def scrape(self) -> Samples:
        text, _ = self.get("/metrics")
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples

    def value(self, name: str, **labels: str) -> float | None:
        return self.scrape().get((name, frozenset(labels.items())))

    def wait_value(self, expected: float, name: str, **labels: str) -> None:
        wait_until(lambda: self.value(name, **labels) == expected, what=f"{name}{labels} == {expected}")


@pytest.fixture
def server(tmp_path: object) -> Iterator[Server]:
    proc = Server(str(tmp_path))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def add(server: NodeAgentProc, uid: str) -> Any:
    try:
        return server.add_pod(uid, pod_netns())
    except grpc.RpcError as exc:
        return exc


def test_metrics_are_prometheus_text_with_the_documented_names(server: Server) -> None:
    text, content_type = server.get("/metrics")
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["ztunnel_connected"] == "gauge"
    assert families["zds_pods_enrolled"] == "gauge"
    assert families["zds_watchers"] == "gauge"
    assert families["process_open_fds"] == "gauge"
    assert families["target_info"] == "gauge"
    # counters and histograms show up once something was counted; their names
    # after the exporter's renaming (OpenTelemetry "zds_ack_latency" in "s" ->
    # zds_ack_latency_seconds, counters -> _total) are checked below.
    assert server.value("ztunnel_connected") == 0
    assert all(server.value("zds_pods_enrolled", state=s) == 0 for s in ("pending", "acked", "failed"))
    assert "otel_scope_name" not in text  # no per-series scope labels: the names are the API


def test_refused_and_dropped_ztunnel_connections_are_counted_by_reason(tmp_path: Path, peers: Peers) -> None:
    server = Server(str(tmp_path), "--max-connections", "1", "--hello-timeout", "60")
    try:
        server.wait_ready()
        served = peers.raw(server.zds_socket)
        served.hello()
        assert served.expect().payload == bytes.fromhex("1a00")  # the (empty) snapshot
        served.ack()
        refused = peers.raw(server.zds_socket)
        refused.hello()
        refused.expect_closed()
        server.wait_value(1, "zds_ztunnel_connections_refused_total", reason="limit")
        for _ in range(64 + 2):  # silent: 64 may wait for their hello, the 2 oldest are dropped
            peers.raw(server.zds_socket)
        server.wait_value(2, "zds_ztunnel_connections_refused_total", reason="crowded")
        assert server.value("zds_ztunnel_connections_refused_total", reason="limit") == 1
    finally:
        server.stop()


def test_metrics_follow_connections_pods_and_acks(server: Server, peers: Peers) -> None:
    assert isinstance(add(server, "u1"), grpc.RpcError)  # no ztunnel: cached, pending
    server.wait_value(1, "zds_pods_enrolled", state="pending")
    assert server.value("zds_pod_enrollments_total", outcome="no_connection") == 1

    old = peers.acking(server.zds_socket)
    server.wait_value(1, "ztunnel_connected")
    server.wait_value(1, "zds_pods_enrolled", state="acked")  # delivered in the snapshot
    assert server.value("zds_pods_enrolled", state="pending") == 0
    server.wait_value(1, "zds_messages_total", type="snapshot_sent", outcome="acked")
    assert server.value("zds_messages_total", type="add", outcome="acked") == 1

    new = peers.acking(server.zds_socket, nack={"u2": "failure to start proxy : port taken"})
    server.wait_value(2, "ztunnel_connected")
    assert isinstance(add(server, "u2"), grpc.RpcError)  # the newest connection nacks it
    server.wait_value(1, "zds_pods_enrolled", state="failed")
    samples = server.scrape()
    assert samples[("zds_messages_total", frozenset({("type", "add"), ("outcome", "nacked")}))] == 1
    assert samples[("zds_pod_enrollments_total", frozenset({("outcome", "nacked")}))] == 1
    # every answered add is in the latency histogram: 2 snapshot adds (one per connection) + 1 nacked
    assert samples[("zds_ack_latency_seconds_count", frozenset({("type", "add")}))] == 3
    assert samples[("zds_ack_latency_seconds_bucket", frozenset({("type", "add"), ("le", "+Inf")}))] == 3
    assert 0 < samples[("zds_ack_latency_seconds_sum", frozenset({("type", "add")}))] < 15

    add(server, "u3")
    server.wait_value(1, "zds_pod_enrollments_total", outcome="acked")
    server.remove_pod("u1")  # DelWorkload to both connections
    server.wait_value(2, "zds_messages_total", type="del", outcome="acked")
    assert server.value("zds_pods_enrolled", state="acked") == 1

    old.close()  # the old ztunnel goes away (EOF found by the keepalive probe)
    server.wait_value(1, "ztunnel_connected")
    new.close()
    server.wait_value(0, "ztunnel_connected")


def test_a_request_that_never_gets_its_ack_counts_as_unanswered(tmp_path: object) -> None:
    server = Server(str(tmp_path), "--ack-timeout", "0.5")
    peer: RawPeer | None = None
    try:
        server.wait_ready()
        peer = RawPeer(server.zds_socket)
        peer.hello()
        peer.take_snapshot()
        server.wait_value(1, "ztunnel_connected")
        assert isinstance(add(server, "u1"), grpc.RpcError)  # never acked: the connection is closed
        server.wait_value(1, "zds_messages_total", type="add", outcome="unanswered")
        assert server.value("zds_pod_enrollments_total", outcome="timeout") == 1
        server.wait_value(0, "ztunnel_connected")
    finally:
        if peer is not None:
            peer.close()
        server.stop()


def test_cni_plugin_requests_are_counted_by_response_code(server: Server, peers: Peers) -> None:
    body = json.dumps({"Netns": pod_netns(), "PodName": "web", "PodNamespace": "shop"}).encode()
    assert post_unix(server.cni_socket, "/cmdadd", b"not json")[0] == 400
    assert post_unix(server.cni_socket, "/cmdadd", body)[0] == 500  # no ztunnel connection
    peers.acking(server.zds_socket)
    server.wait_value(1, "ztunnel_connected")
    assert post_unix(server.cni_socket, "/cmdadd", body)[0] == 200
    assert post_unix(server.cni_socket, "/cmdadd", body)[0] == 200
    assert post_unix(server.cni_socket, "/cmdcheck", body)[0] == 200
    assert post_unix(server.cni_socket, "/cmddel", json.dumps({"Netns": pod_netns()}).encode())[0] == 400
    samples = server.scrape()
    counts = {
        dict(labels)["response_code"]: value
        for (name, labels), value in samples.items()
        if name == "istio_cni_plugin_requests_total"
    }
    assert counts == {"200": 2, "400": 1, "500": 1}  # /cmdadd only, as Istio (DEL and CHECK were counted)
    events = {
        (dict(labels)["event"], dict(labels)["response_code"]): value
        for (name, labels), value in samples.items()
        if name == "zds_cni_events_total"
    }
    assert events == {
        ("add", "200"): 2,
        ("add", "400"): 1,
        ("add", "500"): 1,
        ("check", "200"): 1,
        ("del", "400"): 1,
    }


def test_watchers_are_a_gauge(server: Server) -> None:
    with server.control() as stub:
        stream = stub.Watch(nodeagent_pb2.WatchRequest())
        try:
            next(stream)
            server.wait_value(1, "zds_watchers")
        finally:
            stream.cancel()
    server.wait_value(0, "zds_watchers")


def test_metrics_speak_openmetrics_when_asked(server: Server) -> None:
    text, content_type = server.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    names = {f.name for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    assert {"ztunnel_connected", "zds_pods_enrolled"} <= names


def test_the_ready_line_names_the_port_an_ephemeral_http_listen_was_given(tmp_path: Path) -> None:
    proc = NodeAgentProc(str(tmp_path), "--http-listen", "127.0.0.1:0")
    try:
        proc.wait_ready()
        [bound] = re.findall(r"HTTP \(/healthz, /readyz, /metrics\) listening on (\S+)", proc.output())
        assert not bound.endswith(":0")
        assert re.search(rf"node agent ready: .* http={re.escape(bound)} ", proc.output()), proc.output()
        with urllib.request.urlopen(f"http://{bound}/healthz", timeout=10) as resp:
            assert resp.read() == b"ok\n"
    finally:
        proc.stop()


def test_healthz_and_readyz_still_answer(server: Server) -> None:
    assert server.get("/healthz")[0] == "ok\n"
    assert server.get("/readyz")[0].startswith("ready: 0 ztunnel connection(s)")


def test_an_accept_header_the_exporter_cannot_read_gets_the_text_format(server: Server) -> None:
    """It was a 500 and a TypeError traceback in the node agent's log."""
    text, content_type = server.get("/metrics", accept="application/openmetrics-text; version=abc")
    assert content_type.startswith("text/plain") and "zds_pods_enrolled" in text
    assert "Traceback" not in server.output()


def test_half_requests_are_bounded_and_closed_in_time_and_the_agent_keeps_serving(server: Server) -> None:
    """20,000 connections that each sent half a request held every fd the agent may open
    (zds pod add then failed): at most 64 are kept, each new one in the place of the oldest
    (a real request is answered meanwhile); those too are closed once they bring no whole
    request within 10 s; the endpoint answers after."""
    check_half_requests_bounded(
        server.pid, server.http, b"GET /metrics HTTP/1.1\r\nHost: x\r\n", server.output, "/healthz"
    )
    assert server.get("/healthz")[0] == "ok\n"
    assert server.list_pods() == []  # the control API answers too
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("how", WAYS_OF_WAITING)
def test_connections_not_in_a_request_make_room(server: Server, how: str) -> None:
    """64 connections that each asked once and stayed open, pipelined requests and read no
    answer, or sent a head and no body held every place (keep-alive's 10 s; ~16 s; the body's
    10 s): anyone on the node could keep /readyz and /metrics from answering, connecting again
    as they were closed."""
    check_places_not_held(server.http, "/healthz", server.output, how=how)
    assert server.get("/healthz")[0] == "ok\n"
    assert "Traceback" not in server.output()


def test_an_add_pod_refused_before_its_enrollment_counts_as_invalid(server: Server) -> None:
    """A request with no netns, a relative path or a bad address was refused before the
    enrollment began and was never counted (AddPod and the bulk path alike)."""
    from zds.gen import nodeagent_pb2_grpc

    requests = [
        nodeagent_pb2.AddPodRequest(uid="u1"),
        nodeagent_pb2.AddPodRequest(uid="u2", netns_path="relative/pod"),
        nodeagent_pb2.AddPodRequest(uid="u3", netns_path="/var/run/netns/x", ips=["not-an-ip"]),
    ]
    with grpc.insecure_channel(f"unix:{server.control_socket}") as channel:
        stub = nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]
        for request in requests:
            with pytest.raises(grpc.RpcError) as refused:
                stub.AddPod(request, timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        results = [
            r
            for reply in stub.AddPods(iter([nodeagent_pb2.AddPodsRequest(pods=requests)]), timeout=10)
            for r in reply.results
        ]
        assert len(results) == 3 and all(r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in results)
    server.wait_value(4, "zds_pod_enrollments_total", outcome="invalid")  # no netns, a bad address
    assert server.value("zds_pod_enrollments_total", outcome="refused") == 2  # a relative path


def test_a_request_aiohttp_cannot_parse_is_one_warning_line_not_a_traceback(server: Server) -> None:
    """A header over 8 KB was answered 400 and logged at error with aiohttp's traceback."""
    import socket

    host, port = server.http.split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.0 400 Bad Request")
    wait_until(lambda: "(LineTooLong); answered 400" in server.output(), "the warning line")
    [line] = [line for line in server.output().splitlines() if "LineTooLong" in line]
    assert " warning aiohttp.server: Error handling request from 127.0.0.1: 400" in line
    assert "Traceback" not in server.output() and " error " not in server.output()


def test_otel_sdk_disabled_turns_off_the_exporters_not_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK reads OTEL_SDK_DISABLED itself and made every instrument a no-op: /metrics then
    had only the process_* series. The README says the variable leaves /metrics answering."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    server = Server(str(tmp_path))
    try:
        server.wait_ready()
        assert server.value("ztunnel_connected") == 0
        add(server, "u-disabled")  # no ztunnel: an enrollment that found no connection
        server.wait_value(1, "zds_pod_enrollments_total", outcome="no_connection")
        # Its HELP names every outcome (it named 6 of the 11).
        text, _ = server.get("/metrics")
        [help_text] = [
            f.documentation for f in text_string_to_metric_families(text) if f.name == "zds_pod_enrollments"
        ]
        assert [o.value for o in EnrollmentOutcome if o.value not in help_text] == [], help_text
    finally:
        server.stop()


def test_the_pods_gauge_holds_its_count_through_the_stop() -> None:
    """The node agent's cache is emptied as it closes, before the exporters' last push: that
    push said 0 pods in every state, as if every pod were gone at each restart."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

    from zds.server.telemetry import Telemetry

    reader = InMemoryMetricReader()
    telemetry = Telemetry(metric_readers=[reader])
    pods = {"acked": 500}
    telemetry.observe(connected=lambda: 1, pods_by_state=lambda: pods, watchers=lambda: 0)

    def acked() -> float:
        data = reader.get_metrics_data()
        assert data is not None
        return next(
            point.value
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "zds_pods_enrolled"
            for point in metric.data.data_points
            if isinstance(point, NumberDataPoint) and point.attributes == {"state": "acked"}
        )

    assert acked() == 500
    telemetry.hold_pods()
    pods.clear()  # (the cache, closed)
    assert acked() == 500
