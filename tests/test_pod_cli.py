"""`zds pod add|remove|list` against a real `zds server`, plus health and reflection."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.harness import (
    ZDS,
    NodeAgentProc,
    StartServer,
    fd_count,
    free_port,
    pod_netns,
    pod_netns_pid,
    pods_file,
    wait_until,
)
from tests.standins import RawPeer, request_of
from zds import defaults
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.protocol.messages import DelWorkload
from zds.server import bulkwire

pytestmark = pytest.mark.root


def serve_acks(peer: RawPeer, count: int, error: str = "") -> threading.Thread:
    """Answer ``count`` requests on ``peer`` in the background."""

    def run() -> None:
        for _ in range(count):
            got = peer.expect()
            got.close_fds()
            peer.ack(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def connected_peer(server: NodeAgentProc) -> RawPeer:
    peer = RawPeer(server.zds_socket)
    peer.hello()
    peer.take_snapshot()
    return peer


def test_pod_add_prints_the_ack_and_exits_zero(server: NodeAgentProc) -> None:
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 1)
        out = server.cli(
            "pod",
            "add",
            "--uid",
            "u1",
            "--name",
            "productpage",
            "--namespace",
            "bookinfo",
            "--service-account",
            "bookinfo-productpage",
            "--netns",
            pod_netns(),
        )
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 0, out.stderr
    assert "pod u1 (bookinfo/productpage) enrolled: acked by ztunnel connection" in out.stdout


@pytest.mark.parametrize("how", [["--netns-pid", "{pid}"], ["--netns", "pid:{pid}"]])
def test_pod_add_by_pid(server: NodeAgentProc, how: list[str]) -> None:
    """``--netns-pid N``, or ``--netns pid:N`` as a pods file writes it (that was taken as a
    bare name, ``/var/run/netns/pid:N``, and the answer said to create a netns of that name)."""
    pid = pod_netns_pid()
    netns = os.stat(f"/proc/{pid}/ns/net")
    assert netns.st_ino != os.stat("/proc/self/ns/net").st_ino  # (a pod's, not the node's)
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 1)
        out = server.cli("pod", "add", "--uid", "u1", *(arg.format(pid=pid) for arg in how))
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 0, out.stderr
    assert "pod u1 (default/u1) enrolled: acked by ztunnel connection" in out.stdout
    [pod] = json.loads(server.cli("pod", "list", "--json").stdout)
    assert pod["uid"] == "u1" and pod["netns_path"] == f"/proc/{pid}/ns/net"
    assert (int(pod["netns"]["dev"]), int(pod["netns"]["ino"])) == (netns.st_dev, netns.st_ino)


def test_pod_add_records_the_addresses_given_and_refuses_what_is_not_one(
    server: NodeAgentProc, tmp_path: Path
) -> None:
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 1)
        out = server.cli(
            "pod", "add", "--uid", "u1", "--netns", pod_netns(), "--ip", "10.0.0.9", "--ip", "fd00::9"
        )
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 0, out.stderr
    [pod] = json.loads(server.cli("pod", "list", "--json").stdout)
    assert pod["ips"] == ["10.0.0.9", "fd00::9"]
    bad = server.cli("pod", "add", "--uid", "u2", "--netns", pod_netns(), "--ip", "10.0.0.256")
    assert bad.returncode == 2
    assert "argument --ip: '10.0.0.256' is not an IPv4 or IPv6 address" in bad.stderr
    pods = pods_file(tmp_path, [{"uid": "u3", "netns": pod_netns()}])
    mixed = server.cli("pod", "add", "--from-file", pods, "--ip", "10.0.0.9")
    assert mixed.returncode == 2 and mixed.stderr.splitlines()[-1] == (
        "zds pod add: error: --from-file cannot be combined with --uid/--netns/--netns-pid/--ip"
    )
    # (as zds pod remove without --uid: the flags a command needs, refused as argparse refuses them)
    for flags, said in ((["--netns", pod_netns()], "--uid is required (or --from-file)"),
                        (["--uid", "u4"], "--netns PATH or --netns-pid PID is required")):  # fmt: skip
        missing = server.cli("pod", "add", *flags)
        assert missing.returncode == 2 and missing.stderr.splitlines()[-1] == f"zds pod add: error: {said}"
    no_uid = server.cli("pod", "remove")
    assert (
        no_uid.returncode == 2
        and "zds pod remove: error: the following arguments are required: --uid" in no_uid.stderr
    )
    empty = pods_file(tmp_path, [])
    nothing = server.cli("pod", "add", "--from-file", empty)  # exited 0 with no word: nothing was acked
    assert (
        nothing.returncode == 1
        and nothing.stderr == f"zds pod add: {empty}: no pods in it, nothing to enroll\n"
    )
    assert [p["uid"] for p in json.loads(server.cli("pod", "list", "--json").stdout)] == ["u1"]


def test_pod_add_without_ztunnel_exits_nonzero_and_the_pod_stays_listed(server: NodeAgentProc) -> None:
    out = server.cli("pod", "add", "--uid", "u1", "--netns", pod_netns())
    assert out.returncode == 1
    assert "no ztunnel connection" in out.stderr
    listed = server.cli("pod", "list", "--json")
    [pod] = json.loads(listed.stdout)
    assert (
        pod["uid"] == "u1"
        and pod["state"] == "POD_STATE_PENDING"
        and pod["last_error"] == "no ztunnel connection"
    )


def test_pod_add_nack_exits_nonzero_with_the_nack_text(server: NodeAgentProc) -> None:
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 1, error="failure to start proxy : address in use")
        out = server.cli("pod", "add", "--uid", "u1", "--netns", pod_netns())
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 1
    assert "FAILED_PRECONDITION: failure to start proxy : address in use" in out.stderr


def test_a_nack_with_escape_sequences_reaches_no_terminal_and_no_log_raw(server: NodeAgentProc) -> None:
    """A ztunnel's nack text went raw to zds pod add's error, zds pod list's LAST-ERROR, zds
    watch and the node agent's log: a title change and colours, or a line of its own. What
    is not printable is now written as its escape, everywhere."""
    hostile = "x\x1b]0;PWNED\x07\x1b[31mRED\nsecond line"
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 1, error=hostile)
        out = server.cli("pod", "add", "--uid", "u1", "--netns", pod_netns())
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert line.endswith("x\\x1b]0;PWNED\\x07\\x1b[31mRED\\nsecond line"), line
    listed = server.cli("pod", "list")
    assert "\x1b" not in listed.stdout and "x\\x1b]0;PWNED" in listed.stdout
    log = server.output()
    assert "\x1b" not in log and "\nsecond line" not in log


def test_pod_add_bad_netns_says_what_is_wrong(server: NodeAgentProc) -> None:
    out = server.cli("pod", "add", "--uid", "u1", "--netns", "/var/run/netns/zdst-missing")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr and "/var/run/netns/zdst-missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_pod_add_from_file_enrolls_many_over_one_connection(server: NodeAgentProc, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "pods.yaml")
    with open(path, "w") as f:
        f.write("pods:\n")
        for i in range(5):
            f.write(
                f"  - {{uid: u{i}, name: p{i}, namespace: ns, service_account: sa, netns: '{pod_netns()}'}}\n"
            )
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 5)
        out = server.cli("pod", "add", "--from-file", path)
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("enrolled: acked") == 5
    listed = server.cli("pod", "list")
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:5] == ["UID", "NAME", "NAMESPACE", "SERVICE-ACCOUNT", "STATE"]
    assert sorted(line.split()[0] for line in lines[1:]) == [f"u{i}" for i in range(5)]
    assert all(line.split()[4] == "acked" for line in lines[1:])


def test_pod_remove_reports_each_connection(server: NodeAgentProc) -> None:
    server.cli("pod", "add", "--uid", "u1", "--netns", pod_netns())
    peer = connected_peer(server)  # gets u1 in its snapshot
    try:
        thread = serve_acks(peer, 1)
        out = server.cli("pod", "remove", "--uid", "u1")
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 0, out.stderr
    assert "DelWorkload to ztunnel connection" in out.stdout and "acked" in out.stdout
    assert json.loads(server.cli("pod", "list", "--json").stdout) == []
    missing = server.cli("pod", "remove", "--uid", "u1")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_pod_remove_says_rules_that_would_not_come_out(tmp_path: Path) -> None:
    """The removal's answer said only how each ztunnel took the DelWorkload: rules still in the
    pod's netns (their removal failed, and is retried) went unsaid but in the node agent's log."""
    tools = tmp_path / "tools"
    tools.mkdir()
    broken = tmp_path / "broken"
    real = subprocess.run(["sh", "-c", "command -v iptables-restore"], capture_output=True, text=True).stdout
    fake = tools / "iptables-restore"
    fake.write_text(
        f'#!/bin/sh\n[ -e {broken} ] && {{ echo "boom" >&2; exit 1; }}\nexec {real.strip()} "$@"\n'
    )
    fake.chmod(0o755)
    server = NodeAgentProc(
        str(tmp_path), redirect=True, env_path=f"{tools}:{os.environ['PATH']}"
    ).wait_ready()
    try:
        added = server.cli("pod", "add", "--uid", "u1", "--netns", pod_netns())
        assert json.loads(server.cli("pod", "list", "--json").stdout)[0]["rules_installed"], added.stderr
        broken.touch()
        out = server.cli("pod", "remove", "--uid", "u1")
        assert out.returncode == 0, out.stderr
        assert "u1: its in-pod rules are still in its netns: they did not come out" in out.stderr
        broken.unlink()
        wait_until(lambda: "rules a failed removal left are taken out now" in server.output(), "the retry")
        again = server.cli("pod", "add", "--uid", "u2", "--netns", pod_netns())
        assert "still in" not in server.cli("pod", "remove", "--uid", "u2").stderr, again.stderr
    finally:
        server.stop()


def test_removing_a_pod_not_enrolled_still_tells_every_ztunnel_as_istio_does(server: NodeAgentProc) -> None:
    # (a ztunnel may hold a workload the node agent forgot; Istio's RemovePodFromMesh sends
    # DelWorkload whatever its cache holds)
    peer = connected_peer(server)
    received = []

    def answer() -> None:
        got = peer.expect()
        got.close_fds()
        received.append(request_of(got))
        peer.ack("")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        out = server.cli("pod", "remove", "--uid", "ghost")
        thread.join(10)
    finally:
        peer.close()
    assert received == [DelWorkload(uid="ghost")]
    assert out.returncode == 1
    assert "NOT_FOUND" in out.stderr and "no pod with uid ghost is enrolled" in out.stderr
    assert "DelWorkload sent to 1 ztunnel connection(s) anyway" in out.stderr
    assert json.loads(server.cli("pod", "list", "--json").stdout) == []


def test_the_node_agents_own_answer_is_shown_even_when_it_says_permission_denied(
    server: NodeAgentProc,
) -> None:
    """Only a connection refused with EACCES is "cannot reach the node agent: permission
    denied"; an answer whose words say so (a netns the agent may not open, a uid) is shown as
    the agent gave it, with its status."""
    missing = server.cli("pod", "remove", "--uid", "permission denied")
    assert missing.returncode == 1
    [line] = missing.stderr.splitlines()
    assert line.startswith("zds pod remove: NOT_FOUND: ") and "permission denied" in line, line


def test_pod_commands_say_when_the_node_agent_is_not_running(tmp_path: object) -> None:
    out = subprocess.run(
        [*ZDS, "pod", "list", "--control-socket", os.path.join(str(tmp_path), "nope.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "is `zds server` running" in out.stderr


def test_health_service_answers_serving(server: NodeAgentProc) -> None:
    with grpc.insecure_channel(f"unix:{server.control_socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "zds.v1.NodeAgent"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_node_agent_service(server: NodeAgentProc) -> None:
    with grpc.insecure_channel(f"unix:{server.control_socket}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [resp] = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in resp.list_services_response.service}
        # The same under v1's name (the messages are v1alpha's on the wire): it was UNIMPLEMENTED.
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        [by_v1] = list(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    assert {"zds.v1.NodeAgent", "grpc.health.v1.Health"} <= names
    assert {s.name for s in by_v1.list_services_response.service} == names


def test_control_api_on_tcp_in_plaintext_only_when_asked_and_with_a_warning(tmp_path: object) -> None:
    port = free_port()
    proc = NodeAgentProc(str(tmp_path), "--grpc-listen", f"127.0.0.1:{port}", "--grpc-insecure")
    try:
        proc.wait_ready()
        assert "the control API is served in PLAINTEXT on 127.0.0.1:" in proc.output()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(service="zds.v1.NodeAgent"), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.stop()


def test_a_control_api_on_tcp_port_0_logs_the_port_it_got(tmp_path: object) -> None:
    """The ready line and the warning said 127.0.0.1:0; the port had to be found with ss."""
    proc = NodeAgentProc(str(tmp_path), "--grpc-listen", "127.0.0.1:0", "--grpc-insecure")
    try:
        proc.wait_ready()
        [port] = re.findall(
            r"control API \(gRPC\) listening on 127\.0\.0\.1:(\d+) \(plaintext\)", proc.output()
        )
        assert int(port) > 0 and f"grpc=127.0.0.1:{port} " in proc.output()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(service="zds.v1.NodeAgent"), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.stop()


def test_the_tcp_control_api_holds_a_bounded_number_of_connections(tmp_path: object) -> None:
    """Who reaches --grpc-listen and finishes gRPC's handshake, then says nothing: each such
    connection was held for as long as its client liked (300 held 300 fds, the pods' fd
    budget). Now at most CONTROL_TCP_CONNECTIONS are, and calls work again once they go."""
    proc = NodeAgentProc(str(tmp_path), "--grpc-listen", "127.0.0.1:0", "--grpc-insecure")
    held: list[socket.socket] = []
    try:
        proc.wait_ready()
        [port] = re.findall(r"control API \(gRPC\) listening on 127\.0\.0\.1:(\d+)", proc.output())
        before = fd_count(proc.pid)
        settings = bytes.fromhex("000000040000000000")  # an empty SETTINGS frame
        for _ in range(defaults.CONTROL_TCP_CONNECTIONS + 36):
            conn = socket.create_connection(("127.0.0.1", int(port)))
            held.append(conn)
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings)
        # Each is answered (the server's SETTINGS) or refused (closed) by now.
        wait_until(
            lambda: all(select.select([conn], [], [], 0)[0] for conn in held), "each answered or refused"
        )
        assert fd_count(proc.pid) - before <= defaults.CONTROL_TCP_CONNECTIONS
        for conn in held:
            conn.close()
        # (the node agent sees the closes a little later: until then a new connection is one
        # too many and is closed; the call waits for the channel to connect again)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True
            )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for conn in held:
            conn.close()
        proc.stop()


@pytest.mark.parametrize("command", [["server"], ["ztunnel"], ["demo"]])
def test_without_the_capabilities_each_command_says_which_are_missing(command: list[str]) -> None:
    # Still uid 0, but exec'd with CAP_SYS_ADMIN and CAP_NET_ADMIN out of the bounding set.
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin,-net_admin", *ZDS, *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert (
        f"zds {command[0]}: needs root or CAP_SYS_ADMIN + CAP_NET_ADMIN; missing CAP_SYS_ADMIN, CAP_NET_ADMIN"
        in line
    )


# -- the bulk path: AddPods -------------------------------------------------------------------


def bulk_add(server: NodeAgentProc, over: str, batches: list[nodeagent_pb2.AddPodsRequest]) -> list[Any]:
    """Every answer of one bulk call, over gRPC's AddPods or the control socket's bulk lane
    (``lane-json``: its JSON form, each answer made the AddPodsResult it stands for: its pod
    and uid are not sent)."""
    if over == "grpc":
        with server.control() as stub:
            return [r for reply in stub.AddPods(iter(batches), timeout=30) for r in reply.results]
    lane = bulkwire.connect(server.control_socket, 30)
    if over == "lane":
        return [r for reply in bulkwire.exchange(lane, batches, 30) for r in reply.results]
    pods = [[json_format.MessageToDict(p, preserving_proto_field_name=True) for p in b.pods] for b in batches]
    uids = [p.uid for b in batches for p in b.pods]
    return [
        nodeagent_pb2.AddPodsResult(
            index=a.index,
            uid=uids[a.index],
            code=a.code,
            message=f"{a.status}: {a.message}" if a.code else "",
            response=nodeagent_pb2.AddPodResponse(connection_id=a.connection_id),
        )
        for answers in bulkwire.exchange_json(lane, pods, 30)
        for a in answers
    ]


@pytest.mark.parametrize("over", ["grpc", "lane", "lane-json"])
def test_the_bulk_path_answers_every_pod_with_the_status_addpod_would_give(
    server: NodeAgentProc, over: str
) -> None:
    """AddPods over batches: each pod answered once, by its position in the stream, with
    AddPod's status; AddWorkloads go out one at a time, each acked before the next. The
    bulk lane answers the same (in its JSON form each answer's status by name, and not its
    pod)."""
    peer = connected_peer(server)
    requests = [
        nodeagent_pb2.AddPodRequest(uid="ok-1", netns_path=pod_netns()),
        nodeagent_pb2.AddPodRequest(uid="bad-netns", netns_path="/var/run/netns/zdst-missing"),
        nodeagent_pb2.AddPodRequest(uid="no-netns"),
        nodeagent_pb2.AddPodRequest(uid="nacked", netns_path=pod_netns()),
        nodeagent_pb2.AddPodRequest(uid="ok-2", netns_pid=pod_netns_pid(), ips=["10.0.0.7", "fd00::7"]),
        nodeagent_pb2.AddPodRequest(uid="bad-ip", netns_path=pod_netns(), ips=["10.0.0.8", "10.0.0.300"]),
    ]
    seen: list[str] = []

    def ztunnel() -> None:
        for _ in range(3):  # the three that reach ztunnel
            got = peer.expect()
            got.close_fds()
            uid = request_of(got).uid  # type: ignore[union-attr]
            seen.append(uid)
            peer.ack("failure to start proxy : nack requested" if uid == "nacked" else "")

    thread = threading.Thread(target=ztunnel, daemon=True)
    thread.start()
    try:
        batches = [
            nodeagent_pb2.AddPodsRequest(pods=requests[:2]),
            nodeagent_pb2.AddPodsRequest(pods=requests[2:]),
        ]
        results = bulk_add(server, over, batches)
        thread.join(10)
    finally:
        peer.close()
    by_index = {r.index: r for r in results}
    assert sorted(by_index) == [0, 1, 2, 3, 4, 5] and len(results) == 6
    code = grpc.StatusCode
    assert {r.uid: r.code for r in results} == {
        "ok-1": code.OK.value[0],
        "bad-netns": code.INVALID_ARGUMENT.value[0],
        "no-netns": code.INVALID_ARGUMENT.value[0],
        "nacked": code.FAILED_PRECONDITION.value[0],
        "ok-2": code.OK.value[0],
        "bad-ip": code.INVALID_ARGUMENT.value[0],
    }
    named = over == "lane-json"  # (its answers say the status's name: INVALID_ARGUMENT: ...)
    assert (
        by_index[5].message
        == ("INVALID_ARGUMENT: " if named else "") + "ips[1] '10.0.0.300' is not an IP address"
    )
    assert (
        by_index[3].message
        == ("FAILED_PRECONDITION: " if named else "") + "failure to start proxy : nack requested"
    )
    assert "netns_path or netns_pid is required" in by_index[2].message
    assert by_index[0].response.connection_id and by_index[4].response.connection_id
    pods = {p.uid: p for p in server.list_pods()}
    assert pods["ok-1"].state == pods["ok-2"].state == nodeagent_pb2.POD_STATE_ACKED
    assert list(pods["ok-2"].ips) == ["10.0.0.7", "fd00::7"]
    if not named:
        assert list(by_index[4].response.pod.ips) == ["10.0.0.7", "fd00::7"]
        assert (
            by_index[0].response.pod.state == nodeagent_pb2.POD_STATE_ACKED
            and by_index[4].response.pod.uid == "ok-2"
        )
    else:
        assert not by_index[0].response.HasField("pod")
    assert sorted(seen) == ["nacked", "ok-1", "ok-2"]


def test_pod_add_from_file_says_which_pods_failed_and_exits_one(
    server: NodeAgentProc, tmp_path: object
) -> None:
    path = pods_file(
        tmp_path,
        [{"uid": "good", "netns": pod_netns()}, {"uid": "gone", "netns": "/var/run/netns/zdst-missing"}],
    )
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 1)
        out = server.cli("pod", "add", "--from-file", path)
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 1
    assert "pod good (default/good) enrolled: acked by ztunnel connection" in out.stdout
    assert "zds pod add: gone: INVALID_ARGUMENT: " in out.stderr and "zdst-missing" in out.stderr


@pytest.mark.parametrize("json_output", [False, True], ids=["lines", "json"])
def test_pod_add_from_file_into_a_pipe_whose_reader_went_away_still_enrolls_every_pod(
    server: NodeAgentProc, tmp_path: object, json_output: bool
) -> None:
    """``zds pod add --from-file pods | head -1``: the command stopped at the broken pipe, the
    pods after the first few hundred never enrolled, and it exited 0 (with --json: 0 though
    a pod failed)."""
    count = 600  # several bulk windows: the report breaks long before the last is sent
    entries = [{"uid": f"piped-{i}", "netns": pod_netns()} for i in range(count)]
    path = pods_file(tmp_path, [*entries, {"uid": "gone", "netns": "/var/run/netns/zdst-missing"}])
    read_end, write_end = os.pipe()
    os.close(read_end)  # (head has read its line and gone)
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, count)
        done = subprocess.run(
            [*ZDS, "pod", "add", "--from-file", path, "--control-socket", server.control_socket]
            + (["--json"] if json_output else []),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
        thread.join(30)
    finally:
        os.close(write_end)
        peer.close()
    assert done.returncode == 1, "a pod failed"
    if json_output:
        assert done.stderr == ""
    else:
        assert (
            done.stderr.startswith("zds pod add: gone: INVALID_ARGUMENT: ") and done.stderr.count("\n") == 1
        )
    assert not thread.is_alive(), "not every pod reached ztunnel"
    assert len(server.list_pods()) == count


# -- the bulk lane: zds pod add --from-file on the unix control socket, without gRPC ----------


def test_pod_add_from_file_goes_over_the_bulk_lane_without_loading_grpc_protobuf_or_logging(
    server: NodeAgentProc, tmp_path: object
) -> None:
    """grpc's import alone costs the client ~45 ms, protobuf's ~13: a pods file on the unix
    socket does without them (the lane's JSON form), and enrolls as over gRPC."""
    path = pods_file(tmp_path, [{"uid": f"lane-{i}", "netns": pod_netns()} for i in range(3)])
    run = (
        "import sys; from zds.cli import main; "
        f"code = main(['pod', 'add', '--from-file', {path!r}, '--control-socket', {server.control_socket!r}]); "
        "print('grpc loaded' if 'grpc' in sys.modules else 'grpc not loaded', file=sys.stderr); "
        "print('logging loaded' if 'logging' in sys.modules else 'logging not loaded', file=sys.stderr); "
        "print('protobuf loaded' if 'google.protobuf' in sys.modules else 'protobuf not loaded', file=sys.stderr); "
        "sys.exit(code)"
    )
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 3)
        out = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=60)
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 0, out.stderr
    assert "grpc not loaded" in out.stderr
    assert "logging not loaded" in out.stderr  # it prints; nothing of it logs (~4 ms of its start)
    assert "protobuf not loaded" in out.stderr
    assert out.stdout.count("enrolled: acked by ztunnel connection") == 3
    assert sorted((p.uid, p.state) for p in server.list_pods()) == [
        (f"lane-{i}", nodeagent_pb2.POD_STATE_ACKED) for i in range(3)
    ]


def test_pod_add_from_file_with_json_shows_each_pods_whole_answer(
    server: NodeAgentProc, tmp_path: object
) -> None:
    """``--json`` shows each pod as ``zds pod list --json`` does: over the lane's first form
    (the JSON form's answers do not carry the pod)."""
    path = pods_file(
        tmp_path,
        [
            {"uid": "j-0", "netns": pod_netns(), "ips": ["10.0.0.9"]},
            {"uid": "j-1", "netns": "/var/run/netns/zdst-missing"},
        ],
    )
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 1)
        out = server.cli("pod", "add", "--from-file", path, "--json")
        thread.join(10)
    finally:
        peer.close()
    assert out.returncode == 1 and out.stderr == ""
    enrolled, failed = json.loads(out.stdout)
    assert enrolled["uid"] == "j-0" and enrolled["connection_id"]
    assert enrolled["pod"]["state"] == "POD_STATE_ACKED" and enrolled["pod"]["ips"] == ["10.0.0.9"]
    assert enrolled["pod"] == json.loads(server.cli("pod", "list", "--json").stdout)[0]
    assert failed["uid"] == "j-1" and failed["error"].startswith("INVALID_ARGUMENT: cannot open netns")


def lane_send(server: NodeAgentProc, data: bytes) -> bytes:
    """``data`` to the control socket, half-closed; everything the node agent sends back
    (a reset, when it closed with some of ``data`` unread, ends it as an EOF would)."""
    got = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(server.control_socket)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return got


def lane_opening_and(request: nodeagent_pb2.AddPodsRequest) -> bytes:
    """What a lane client sends first: the opening, then ``request`` framed."""
    return bulkwire.MAGIC + bulkwire.frame(request.SerializeToString())


_POD = nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest(uid="x", netns_path="/nonexistent")])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"ZDS-BULK/9\n" + bulkwire.frame(_POD.SerializeToString()), "it opened with b'ZDS-BULK/9"),
        (bulkwire.MAGIC + bulkwire.HEADER.pack(1, 2) + b"xx", "a frame with flag 1"),
        (bulkwire.MAGIC + bulkwire.HEADER.pack(0, 1024 * 1024 + 1), "the limit is 1048576"),
        (
            lane_opening_and(nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest()] * 1025)),
            "it sent an AddPodsRequest of 1025 pods (at most 1024 a message)",
        ),
        (bulkwire.MAGIC + bulkwire.frame(b"\xff\xff\xff"), "not an AddPodsRequest"),
        (lane_opening_and(_POD)[:-3], "it ended within a frame"),
        (b"ZDS", "it ended within a frame"),
    ],
    ids=["opening", "compressed", "oversized", "too-many-pods", "undecodable", "cut", "cut-opening"],
)
def test_a_broken_bulk_lane_is_closed_with_one_line_and_the_node_agent_serves_on(
    server: NodeAgentProc, data: bytes, reason: str
) -> None:
    # Nothing answered but, when the opening was right, the opening; nothing enrolled.
    assert lane_send(server, data) in (b"", bulkwire.MAGIC)
    server.wait_for_output("a bulk-lane connection closed: ")
    line = next(line for line in server.output().splitlines() if "a bulk-lane connection closed" in line)
    assert reason in line, line
    assert "Traceback" not in server.output()
    assert server.list_pods() == []
    # The next connection, over gRPC or the lane, is served.
    got = lane_send(server, lane_opening_and(_POD))
    assert got.startswith(bulkwire.MAGIC)
    answer = bulkwire.Deframer().feed(got[len(bulkwire.MAGIC) :])
    (result,) = nodeagent_pb2.AddPodsReply.FromString(answer[0]).results
    assert (result.uid, result.code) == ("x", grpc.StatusCode.INVALID_ARGUMENT.value[0])


def json_lane(*messages: bytes) -> bytes:
    """What a client of the lane's JSON form sends: its opening, then ``messages`` framed."""
    return bulkwire.MAGIC_JSON + b"".join(bulkwire.frame(m) for m in messages)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"{", "a message that is not JSON"),
        (b"\xff[]", "a message that is not JSON"),
        (b"[" * 100_000, "a message that is not JSON"),
        (b'{"uid": "x"}', "a message that is not a JSON array of pods"),
        (b"[" + b"{}," * 1024 + b"{}]", "it sent a JSON array of 1025 pods (at most 1024 a message)"),
        (b'[{"uid": "a"}, 5]', "a pod (the 2. of a message) that is not an AddPodRequest: a JSON int"),
        (b'[{"uid": "a", "pod": 1}]', 'has no "pod" field'),
        (b'[{"uid": 5}]', "a pod (the 1. of a message) that is not an AddPodRequest"),
        (b'[{"uid": "a", "netns_pid": true}]', "Expected an int, got a boolean"),
        (b'[{"uid": "a", "netns_pid": 1e3}]', "'float' object cannot be interpreted as an integer"),
        (b'[{"uid": "a", "netns_pid": 4294967296}]', "Value out of range"),
        (b'[{"uid": "a", "ips": "10.0.0.1"}]', "ips is a JSON str, not a list"),
        (b'[{"uid": "a", "netns_path": "/x", "netns_pid": 1}]', "both netns_path and netns_pid"),
        (b'[{"uid": "\\ud800"}]', "surrogates not allowed"),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "deep",
        "not-array",
        "too-many-pods",
        "not-object",
        "unknown-field",
        "wrong-type",
        "bool-pid",
        "float-pid",
        "big-pid",
        "ips-text",
        "two-netns",
        "surrogate",
    ],
)
def test_a_json_lane_message_no_zds_client_sends_closes_the_lane_with_one_line(
    server: NodeAgentProc, message: bytes, reason: str
) -> None:
    """The JSON form's pods are made AddPodRequests (protobuf checks each field's type), and
    what it would take otherwise is refused: a text as ``ips`` (letter by letter), both netns
    fields (the last had won). Refused as an undecodable message: the lane closed, nothing
    enrolled, the node agent serving on."""
    got = lane_send(server, json_lane(b'[{"uid": "first", "netns_path": "/nonexistent"}]', message))
    assert got.startswith(bulkwire.MAGIC_JSON)
    server.wait_for_output("a bulk-lane connection closed: ")
    line = next(line for line in server.output().splitlines() if "a bulk-lane connection closed" in line)
    assert reason in line and "\\n" not in line, line
    assert "Traceback" not in server.output()
    assert server.list_pods() == []
    got = lane_send(server, json_lane(b'[{"uid": "x", "netns_path": "/nonexistent"}]'))
    (answers,) = bulkwire.Deframer().feed(got[len(bulkwire.MAGIC_JSON) :])
    (answer,) = json.loads(answers)
    assert answer == {"index": 0, "code": 3, "status": "INVALID_ARGUMENT", "message": answer["message"]}
    assert answer["message"].startswith("netns path /nonexistent is not under an allowed root")


def test_an_addpods_message_of_too_many_pods_or_bytes_is_refused_before_a_pod_is_looked_at(
    server: NodeAgentProc,
) -> None:
    """Empty pods decode to ~60 times their bytes: 4 MiB of them had been ~250 MB a message."""
    with server.control() as stub:
        many = nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest()] * 1025)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.AddPods(iter([many]), timeout=30))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "an AddPodsRequest of 1025 pods (at most 1024 a message)"
        big = nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest()] * 600_000)
        with pytest.raises(grpc.RpcError) as too_big:
            list(stub.AddPods(iter([big]), timeout=30))
        assert too_big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, too_big.value.details()
    assert server.list_pods() == [] and "Traceback" not in server.output()


def test_a_bulk_lane_client_gone_early_does_not_stop_its_enrollments(server: NodeAgentProc) -> None:
    """As with a gRPC call that ends: the enrollments the node agent took run to their acks."""
    peer = connected_peer(server)
    try:
        thread = serve_acks(peer, 2)
        pods = [nodeagent_pb2.AddPodRequest(uid=f"early-{i}", netns_path=pod_netns()) for i in range(2)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.control_socket)
            sock.sendall(lane_opening_and(nodeagent_pb2.AddPodsRequest(pods=pods)))
        thread.join(10)
    finally:
        peer.close()
    assert not thread.is_alive()
    assert sorted(p.uid for p in server.list_pods()) == ["early-0", "early-1"]


def test_pod_add_from_file_says_in_one_line_when_nothing_listens_on_the_socket(tmp_path: object) -> None:
    """A socket file left by a node agent that is gone: refused, said once, exit 1."""
    path = pods_file(tmp_path, [{"uid": "u1", "netns": "/var/run/netns/x"}])
    dead = os.path.join(str(tmp_path), "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(dead)  # bound, never listened on: connecting is refused
        out = subprocess.run(
            [*ZDS, "pod", "add", "--from-file", path, "--control-socket", dead],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert out.stderr == f"zds pod add: cannot reach the node agent at {dead}: Connection refused\n"


def offer_without_reading(server: NodeAgentProc, first: bytes, chunk: bytes) -> tuple[int, int]:
    """Send ``first``, then ``chunk`` again and again (up to 64 MiB) on a lane connection,
    reading nothing, until the node agent stops reading (2 s without progress): (the bytes it
    took, how much its RSS grew meanwhile, KiB)."""
    rss_before = _rss_kb(server.pid)
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.control_socket)
        sock.settimeout(2)
        try:
            sock.sendall(first)
            while sent < 64 * 1024 * 1024:
                sent += sock.send(chunk)
        except TimeoutError:
            pass  # it stopped reading: what the tests are after
        return sent, _rss_kb(server.pid) - rss_before


def test_a_bulk_lane_client_that_does_not_read_holds_the_node_agent_to_a_bound(server: NodeAgentProc) -> None:
    """Pods refused at once (no netns) answer as fast as they come; a client that sends
    them without reading the answers is stopped by the node agent's flow control (as a
    gRPC stream's would be), its memory bounded, and the next client served."""
    pod = nodeagent_pb2.AddPodRequest(uid="p")  # no netns: INVALID_ARGUMENT, no enrollment
    chunk = b"".join(
        bulkwire.frame(nodeagent_pb2.AddPodsRequest(pods=[pod] * 64).SerializeToString()) for _ in range(256)
    )
    sent, grown_kb = offer_without_reading(server, bulkwire.MAGIC, chunk)  # 64 MiB: ~33 M pods
    assert sent < 16 * 1024 * 1024, (
        f"the node agent took {sent} bytes of requests whose answers were not read"
    )
    assert grown_kb < 64 * 1024, grown_kb
    got = lane_send(server, lane_opening_and(_POD))
    assert got.startswith(bulkwire.MAGIC) and len(got) > len(bulkwire.MAGIC)


def test_a_bulk_lane_client_sending_empty_frames_is_held_to_a_bound_too(server: NodeAgentProc) -> None:
    """Empty requests cost the node agent memory too (a decoded message each, its place in the
    queue): once it stops taking requests (answers unread), they stop being read as well."""
    pods = [nodeagent_pb2.AddPodRequest(uid=f"p{i}") for i in range(1000)]  # refused at once
    batch = nodeagent_pb2.AddPodsRequest(pods=pods).SerializeToString()
    first = bulkwire.MAGIC + bulkwire.frame(batch) * 20  # 20,000 answers
    sent, grown_kb = offer_without_reading(server, first, bulkwire.frame(b"") * 65536)  # 13 M of them
    assert sent < 16 * 1024 * 1024, f"the node agent took {sent} bytes of empty requests"
    assert grown_kb < 64 * 1024, grown_kb


def test_lanes_held_open_with_half_sent_frames_are_bounded_and_the_next_client_goes_over_addpods(
    server: NodeAgentProc, tmp_path: object
) -> None:
    """Each lane may hold a frame of up to 1 MiB (4 MiB once: 300 lanes holding one each took the
    node agent from 144 MB to 1.4 GB). At most BULK_LANES_MAX are open; one more is answered BUSY and
    closed, and `zds pod add --from-file` then sends its pods over AddPods."""
    rss_before = _rss_kb(server.pid)
    half_frame = bulkwire.MAGIC + struct.pack(">BI", 0, 1024 * 1024 - 1) + b"\0" * (1024 * 1024 - 2)
    held: list[socket.socket] = []
    try:
        for _ in range(defaults.BULK_LANES_MAX + 8):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(sock)
            sock.settimeout(10)
            sock.connect(server.control_socket)
            with contextlib.suppress(OSError):  # (one turned away may be closed mid-send)
                sock.sendall(half_frame)
        answers = [sock.recv(64) for sock in held]
        assert answers.count(bulkwire.MAGIC) == defaults.BULK_LANES_MAX, answers
        assert answers.count(bulkwire.BUSY) == 8, answers
        assert _rss_kb(server.pid) - rss_before < (defaults.BULK_LANES_MAX * 5 + 64) * 1024
        path = pods_file(tmp_path, [{"uid": "busy-1", "netns": "/nonexistent"}])
        out = server.cli("pod", "add", "--from-file", path)  # refused (no such netns), over AddPods
        assert out.returncode == 1 and "zds pod add: busy-1: INVALID_ARGUMENT: " in out.stderr, out.stderr
        server.wait_for_output(f"{defaults.BULK_LANES_MAX} bulk lanes are open; one more is closed")
    finally:
        for sock in held:
            sock.close()


def test_bulk_answers_ready_together_go_in_replies_of_at_most_256(server: NodeAgentProc) -> None:
    """2,000 pods refused at once answer together: in replies of at most
    ``BULK_REPLY_RESULTS`` (a reply never nears a message's 4 MiB), each pod once."""
    pods = [nodeagent_pb2.AddPodRequest(uid=f"n-{i}") for i in range(2000)]  # no netns: refused
    lane = bulkwire.connect(server.control_socket, 30)
    batches = [nodeagent_pb2.AddPodsRequest(pods=pods[i : i + 1000]) for i in (0, 1000)]
    replies = list(bulkwire.exchange(lane, batches, 60))
    assert max(len(reply.results) for reply in replies) <= defaults.BULK_REPLY_RESULTS
    assert sorted(r.index for reply in replies for r in reply.results) == list(range(2000))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_bulk_lane_open_at_shutdown_stops_taking_pods(start_server: StartServer) -> None:
    """SIGTERM while a client streams pods: the lane's stream ends with the node agent's,
    nothing starts after the pod store is closed, and the agent exits cleanly."""
    server = start_server()
    stop = threading.Event()

    def stream() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server.control_socket)
            try:
                sock.sendall(bulkwire.MAGIC)
                i = 0
                while not stop.is_set():
                    pods = [
                        nodeagent_pb2.AddPodRequest(uid=f"s-{i}-{j}", netns_path=pod_netns())
                        for j in range(8)
                    ]
                    sock.sendall(bulkwire.frame(nodeagent_pb2.AddPodsRequest(pods=pods).SerializeToString()))
                    i += 1
                    stop.wait(0.005)
            except OSError:
                pass  # the node agent went away

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(server.list_pods()) >= 16, "pods enrolled over the lane (pending: no ztunnel)")
        assert server.stop() == 0
    finally:
        stop.set()
        thread.join(10)
    out = server.output()
    assert "node agent stopped" in out
    assert out.rstrip().endswith("node agent stopped"), out[-2000:]  # nothing after it
    assert "closed database" not in out and "cannot store the pod" not in out, out[-2000:]
    assert "Traceback" not in out


def test_pod_add_from_file_falls_back_to_addpods_on_a_node_agent_from_before_the_lane(
    tmp_path: object,
) -> None:
    """Such a node agent hands the lane's opening to gRPC, which refuses it having taken
    nothing: the command sends the pods over AddPods instead (here to a gRPC-only stand-in)."""
    from concurrent import futures

    from zds.gen import nodeagent_pb2_grpc

    taken: list[str] = []

    class OldAgent(nodeagent_pb2_grpc.NodeAgentServicer):
        def AddPods(self, requests: Any, context: Any) -> Any:
            index = 0
            for request in requests:
                results = []
                for pod in request.pods:
                    taken.append(pod.uid)
                    response = nodeagent_pb2.AddPodResponse(connection_id="old")
                    results.append(nodeagent_pb2.AddPodsResult(index=index, uid=pod.uid, response=response))
                    index += 1
                yield nodeagent_pb2.AddPodsReply(results=results)

    path = pods_file(tmp_path, [{"uid": f"old-{i}", "netns": "/var/run/netns/x"} for i in range(3)])
    sock = os.path.join(str(tmp_path), "control.sock")
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        old = grpc.server(pool)
        nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(OldAgent(), old)  # type: ignore[no-untyped-call]
        old.add_insecure_port(f"unix:{sock}")
        old.start()
        try:
            out = subprocess.run(
                [*ZDS, "pod", "add", "--from-file", path, "--control-socket", sock],
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            old.stop(None).wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("enrolled: acked by ztunnel connection old") == 3
    assert taken == ["old-0", "old-1", "old-2"]  # each once: the lane took nothing


def test_addpods_calls_cancelled_with_their_answers_unread_end_without_a_traceback(
    start_server: StartServer,
) -> None:
    """Clients that send pods refused at once, read none of the answers, then cancel: gRPC
    failed the write the node agent still had out and logged an error with its traceback for
    most of them, as it did for Watch. One debug line each now (the call is over either way)."""
    server = start_server("--log-level", "debug")
    pods = [nodeagent_pb2.AddPodRequest(uid="u" * 1000) for _ in range(64)]  # no netns: refused
    sent = [0]

    def requests() -> Iterator[nodeagent_pb2.AddPodsRequest]:
        for _ in range(2000):
            sent[0] += 1
            yield nodeagent_pb2.AddPodsRequest(pods=pods)

    def stopped_reading() -> bool:  # no request taken for half a second: flow control holds them
        before = sent[0]
        time.sleep(0.5)
        return sent[0] == before

    channels = [grpc.insecure_channel(f"unix:{server.control_socket}") for _ in range(20)]
    try:
        stubs = [nodeagent_pb2_grpc.NodeAgentStub(c) for c in channels]  # type: ignore[no-untyped-call]
        calls = [stub.AddPods(requests()) for stub in stubs]
        wait_until(stopped_reading, "the node agent to stop taking requests")
        for call in calls:
            call.cancel()
        gone = "ExecuteBatchError raised in core by servicer method [/zds.v1.NodeAgent/AddPods]"
        wait_until(lambda: gone in server.output(), "a write cut short by a cancel")
    finally:
        for channel in channels:
            channel.close()
    out = server.output()
    assert f"debug grpc._cython.cygrpc: {gone}\n" in out
    assert "Traceback" not in out and " error " not in out


def test_pod_list_shows_every_pod_when_the_answer_passes_grpcs_default_4_mib(
    server: NodeAgentProc, tmp_path: Path
) -> None:
    # 1,100 pods with the longest netns path taken (4,096 bytes): ~4.6 MB of ListPods answer,
    # over the 4 MiB a gRPC client takes by default ("received message larger than max").
    netns = pod_netns()
    head, name = os.path.split(netns)
    long_path = head + "/." * ((defaults.MAX_NETNS_PATH - len(netns)) // 2 - 1) + "/" + name
    assert len(long_path.encode()) <= defaults.MAX_NETNS_PATH
    count = 1100
    path = tmp_path / "pods.jsonl"
    path.write_text("".join(json.dumps({"uid": f"u{i}", "netns": long_path}) + "\n" for i in range(count)))
    out = server.cli("pod", "add", "--from-file", str(path))  # (no ztunnel: every pod Pending)
    assert out.stderr.count("UNAVAILABLE: no ztunnel connection") == count, out.stderr[-2000:]
    listed = server.cli("pod", "list")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == count + 1
    answer = server.cli("pod", "list", "--json")
    assert answer.returncode == 0, answer.stderr
    pods = json.loads(answer.stdout)
    assert len(pods) == count and {p["netns_path"] for p in pods} == {long_path}


@pytest.mark.parametrize("argv", [["pod", "list"], ["pod", "remove", "--uid", "u1"]])
def test_a_client_timeout_is_said_as_its_own_not_as_the_node_agents(argv: list[str], tmp_path: Path) -> None:
    """A socket that takes the connection and never answers: the client's own deadline was a
    bare ``DEADLINE_EXCEEDED: Deadline Exceeded``, as the node agent's ack timeout looks."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(path)
        silent.listen(8)
        done = subprocess.run(
            [*ZDS, *argv, "--control-socket", path, "--timeout", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"zds {' '.join(argv[:2])}: no answer from the node agent at {path} within 1 s"
    )
