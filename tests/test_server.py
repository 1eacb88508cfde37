"""The node agent (`zds server` as a real process) against a raw-socket ztunnel stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.harness import (
    ZDS,
    NodeAgentProc,
    Pod,
    StartServer,
    async_wait_until,
    fd_count,
    pod_netns,
    pod_netns_pid,
    pods_file,
    post_unix,
    run_unique,
    serve_agent,
    stop_served_agent,
    wait_until,
)
from tests.standins import AckingPeer, Peers, RawPeer, request_of
from zds.gen import nodeagent_pb2
from zds.netns import netns_identity
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    WorkloadInfo,
    encode_ack,
    encode_hello,
)
from zds.protocol.records import Record
from zds.server.connection import ZtunnelConnection
from zds.server.connrecords import ConnectionObserver
from zds.server.link import ConnectionLost
from zds.transport import SeqpacketConnection

pytestmark = pytest.mark.root


def connect(server: NodeAgentProc, peers: Peers, *, snapshot: bool = True) -> RawPeer:
    peer = peers.raw(server.zds_socket)
    if snapshot:
        peer.hello()
        for entry in peer.take_snapshot():
            entry.close_fds()
    return peer


def add_in_thread(server: NodeAgentProc, uid: str, netns: str) -> tuple[threading.Thread, dict[str, object]]:
    """AddPod blocks until the ack; run it beside the peer that answers."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["response"] = server.add_pod(uid, netns)
        except grpc.RpcError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


# -- hello ---------------------------------------------------------------------


def test_a_v1_hello_gets_the_snapshot(server: NodeAgentProc, peers: Peers) -> None:
    peer = connect(server, peers, snapshot=False)
    peer.send(bytes.fromhex("0801"))
    assert peer.expect().payload == bytes.fromhex("1a00")  # empty cache: just SnapshotSent


@pytest.mark.parametrize("hello", ["0802", "0800"])
def test_a_hello_of_another_version_gets_the_snapshot_as_from_istio(
    server: NodeAgentProc, peers: Peers, hello: str
) -> None:
    """Istio's node agent serves any hello that parses (it logs the version); zds's closed
    the connection."""
    peer = connect(server, peers, snapshot=False)
    peer.send(bytes.fromhex(hello))
    assert peer.expect().payload == bytes.fromhex("1a00")
    server.wait_for_output(f"ztunnel's hello names version {int(hello[2:])}, not V1")


def test_a_hello_that_does_not_parse_closes_the_connection(server: NodeAgentProc, peers: Peers) -> None:
    for _ in range(2):
        peer = connect(server, peers, snapshot=False)
        peer.send(bytes.fromhex("ff"))
        peer.expect_closed()
    # Never a connected ztunnel: not "ztunnel disconnected" (which read as if one had gone),
    # and one line each (an info line said the warning's words again, after it).
    wait_until(lambda: server.output().count("closed the connection from") == 2, "both said")
    assert "bad hello" in server.output() and "ztunnel disconnected" not in server.output()
    assert "closed before it was served" not in server.output()


def test_a_silent_peer_is_closed_after_the_hello_timeout(start_server: StartServer, peers: Peers) -> None:
    server = start_server("--hello-timeout", "0.5")
    peer = connect(server, peers, snapshot=False)
    peer.expect_closed(timeout=10)
    server.wait_for_output("no hello from ztunnel within 0.5s")


# -- snapshot ------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_snapshot_holds_every_cached_pod_each_acked_before_the_next(
    start_server: StartServer, peers: Peers, tmp_path: object, loop: str
) -> None:
    entries = [
        {"uid": "u1", "name": "a", "namespace": "ns", "service_account": "sa", "netns": pod_netns()},
        {
            "uid": "u2",
            "name": "b",
            "namespace": "ns",
            "service_account": "sa",
            "netns": f"pid:{pod_netns_pid()}",
        },
        {
            "uid": "u3",
            "name": "c",
            "namespace": "ns",
            "service_account": "sa",
            "netns": "/var/run/netns/zds-absent",
        },
    ]
    extra = ["--pods", pods_file(tmp_path, entries)] + (["--no-uvloop"] if loop == "asyncio" else [])
    server = start_server(*extra)
    peer = connect(server, peers, snapshot=False)
    peer.hello()
    seen: dict[str, tuple[Request, int]] = {}
    for _ in range(3):
        got = peer.expect()
        # one in flight: nothing more arrives until we ack
        assert peer.recv(timeout=0.3) is None
        request = request_of(got)
        assert not isinstance(request, SnapshotSent), "the snapshot's entries come before SnapshotSent"
        seen[request.uid] = (request, len(got.fds))
        if got.fds:
            assert netns_identity(got.fds[0]).ino == os.stat(pod_netns()).st_ino
        got.close_fds()
        peer.ack()
    assert seen == {
        "u1": (AddWorkload("u1", WorkloadInfo("a", "ns", "sa")), 1),
        "u2": (AddWorkload("u2", WorkloadInfo("b", "ns", "sa")), 1),
        "u3": (KeepWorkload("u3"), 0),
    }
    assert peer.expect().payload == bytes.fromhex("1a00")
    peer.ack()
    server.wait_for_output("netns unavailable; the pod stays known and is sent as KeepWorkload")


def test_a_ztunnel_gone_mid_snapshot_is_one_line_not_a_traceback(
    start_server: StartServer, peers: Peers, tmp_path: object
) -> None:
    """A ztunnel that restarts while its snapshot is sent: the entries not yet answered
    fail with the connection, which nobody awaits; no "never retrieved" traceback later."""
    entries = [{"uid": f"u{i}", "netns": pod_netns()} for i in range(3)]
    server = start_server("--pods", pods_file(tmp_path, entries))
    for _ in range(3):
        peer = peers.raw(server.zds_socket)
        peer.hello()
        peer.expect().close_fds()
        peer.close()  # before the first entry's ack
        wait_until(lambda: "connection lost" in server.output() or "closed" in server.output(), "the loss")
    for _ in range(30):  # allocations enough for the collector to run, and free the futures
        server.list_pods()
    connect(server, peers)  # a whole snapshot still goes out
    output = server.output()
    assert "never retrieved" not in output and "Traceback" not in output, output


def test_pods_file_pods_are_listed_before_any_ztunnel_connects(
    start_server: StartServer, tmp_path: object
) -> None:
    entries = [
        {"uid": "u1", "name": "a", "namespace": "ns", "service_account": "sa", "netns": pod_netns()},
        {
            "uid": "u3",
            "name": "c",
            "namespace": "ns",
            "service_account": "sa",
            "netns": "/var/run/netns/zds-absent",
        },
    ]
    server = start_server("--pods", pods_file(tmp_path, entries))
    pods = {p.uid: p for p in server.list_pods()}
    assert set(pods) == {"u1", "u3"}
    assert pods["u1"].netns.ino == os.stat(pod_netns()).st_ino
    assert not pods["u3"].HasField("netns")
    assert all(p.state == nodeagent_pb2.POD_STATE_PENDING for p in pods.values())


# -- live updates ----------------------------------------------------------------


def test_add_goes_to_the_newest_connection_only_and_delete_to_all(
    server: NodeAgentProc, peers: Peers
) -> None:
    old = connect(server, peers)
    new = connect(server, peers)
    thread, result = add_in_thread(server, "u1", pod_netns())
    got = new.expect()
    assert request_of(got) == AddWorkload("u1", WorkloadInfo("u1", "ns", "sa")) and len(got.fds) == 1
    got.close_fds()
    assert old.recv(timeout=0.3) is None
    new.ack()
    thread.join(10)
    assert "response" in result

    done = threading.Event()

    def remove() -> None:
        server.remove_pod("u1")
        done.set()

    threading.Thread(target=remove).start()
    for peer in (old, new):
        got = peer.expect()
        assert request_of(got) == DelWorkload("u1") and got.fds == []
        peer.ack()
    assert done.wait(10)


def test_a_nack_is_reported_with_its_text_and_the_pod_stays_cached(
    server: NodeAgentProc, peers: Peers
) -> None:
    peer = connect(server, peers)
    thread, result = add_in_thread(server, "u1", pod_netns())
    peer.expect().close_fds()
    peer.ack("failure to start proxy : port taken")
    thread.join(10)
    err = result["error"]
    assert isinstance(err, grpc.RpcError)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "failure to start proxy : port taken" in (err.details() or "")
    [pod] = server.list_pods()
    assert (
        pod.state == nodeagent_pb2.POD_STATE_FAILED
        and pod.last_error == "failure to start proxy : port taken"
    )


def test_without_ztunnel_add_is_unavailable_and_the_pod_goes_out_in_the_next_snapshot(
    server: NodeAgentProc, peers: Peers
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.add_pod("u1", pod_netns())
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "no ztunnel connection" in (info.value.details() or "")
    peer = connect(server, peers, snapshot=False)
    peer.hello()
    got = peer.expect()
    assert request_of(got) == AddWorkload("u1", WorkloadInfo("u1", "ns", "sa")) and len(got.fds) == 1
    got.close_fds()
    peer.ack()
    assert peer.expect().payload == bytes.fromhex("1a00")
    peer.ack()
    wait_until(lambda: server.list_pods()[0].state == nodeagent_pb2.POD_STATE_ACKED, what="pod acked")


def test_delete_is_done_even_without_a_ztunnel(server: NodeAgentProc) -> None:
    with pytest.raises(grpc.RpcError):
        server.add_pod("u1", pod_netns())
    resp = server.remove_pod("u1")
    assert resp.pod.uid == "u1" and list(resp.deliveries) == []
    assert server.list_pods() == []


POD_NETNS = "<the pod netns>"  # resolved when the test runs (making it needs root)


@pytest.mark.parametrize(
    ("uid", "netns", "name", "text"),
    [
        ("", POD_NETNS, "x", "pod uid is empty"),
        ("u1", "/var/run/netns/zds-never-made", "x", "/var/run/netns/zds-never-made"),
        ("u1", "/nonexistent/netns", "x", "is not under an allowed root"),
        ("u1", "/var/run/netns/../../../etc/hostname", "x", "is not under an allowed root"),
        ("u1", f"/proc/{os.getpid()}/ns/net", "x", "is the node agent's own netns"),  # a host process
        # (over 253 characters too: what ztunnel would do with it comes first)
        (
            "u1",
            POD_NETNS,
            "n" * 1100,
            "pod u1: its AddWorkload would be 1121 bytes, over ztunnel's 1024-byte",
        ),
        ("u1", POD_NETNS, "n" * 300, "at most 253 characters"),
        ("u1", POD_NETNS, "Web_1", "is not a DNS-1123 subdomain"),
        ("  ", POD_NETNS, "x", "is blank"),
    ],
)
def test_bad_input_is_invalid_argument_and_not_cached(
    server: NodeAgentProc, uid: str, netns: str, name: str, text: str
) -> None:
    netns = pod_netns() if netns == POD_NETNS else netns
    with pytest.raises(grpc.RpcError) as info:
        server.add_pod(uid, netns, name=name)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert text in (info.value.details() or "")
    assert "Traceback" not in (info.value.details() or "")
    assert server.list_pods() == []


def test_a_request_that_does_not_decode_is_invalid_argument_on_every_kind_of_method(
    server: NodeAgentProc,
) -> None:
    """A uid that is not UTF-8, bytes that are no protobuf: grpcio's deserializer let the
    DecodeError out (UNKNOWN, "Unexpected <class ...DecodeError>", and a line in the node
    agent's log for each: a client could fill it). Now as any bad request: no line."""
    not_utf8 = bytes.fromhex("0a02fffe")  # (AddPodRequest.uid, two bytes that are not UTF-8)
    with grpc.insecure_channel(f"unix:{server.control_socket}") as channel:
        calls: dict[str, Callable[[bytes], object]] = {
            "AddPod": lambda data: channel.unary_unary("/zds.v1.NodeAgent/AddPod")(data, timeout=30),
            "RemovePod": lambda data: channel.unary_unary("/zds.v1.NodeAgent/RemovePod")(data, timeout=30),
            "Watch": lambda data: list(channel.unary_stream("/zds.v1.NodeAgent/Watch")(data, timeout=30)),
            "AddPods": lambda data: list(
                channel.stream_stream("/zds.v1.NodeAgent/AddPods")(iter([data]), timeout=30)
            ),
        }
        for method, call in calls.items():
            for data in (not_utf8, b"\xff\xff\xff\xff"):
                with pytest.raises(grpc.RpcError) as info:
                    call(data)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
                details = info.value.details() or ""
                assert details.startswith(
                    "the request is not a message of this method: Error parsing message"
                ), (
                    method,
                    details,
                )
        # Refused once the stream reaches it, and the stream ends as on its own errors: the
        # answers to what came before are not lost (refused from within the stream's reader,
        # they had been). (Sent at once after pods still enrolling:
        # test_a_refused_message_in_a_stream_comes_after_every_answer_before_it.)
        bulk = channel.stream_stream("/zds.v1.NodeAgent/AddPods")
        first = nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest(uid="", netns_path="/x")])
        answered = threading.Event()

        def requests() -> Iterator[bytes]:
            yield first.SerializeToString()
            answered.wait(30)
            yield b"\xff\xff\xff\xff"

        replies: list[bytes] = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in bulk(requests(), timeout=30):
                replies.append(reply)
                answered.set()
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        [answer] = [
            result for data in replies for result in nodeagent_pb2.AddPodsReply.FromString(data).results
        ]
        assert (answer.index, answer.code) == (0, grpc.StatusCode.INVALID_ARGUMENT.value[0]), answer
    assert "DecodeError" not in server.output() and "Traceback" not in server.output()
    assert server.list_pods() == []


@pytest.mark.parametrize("refused", ["undecodable", "too many pods"])
def test_a_refused_message_in_a_stream_comes_after_every_answer_before_it(
    server: NodeAgentProc, refused: str
) -> None:
    """A message refused while the pods of the messages before it were still enrolling put the
    stream's end ahead of their answers: the call ended with some or none of them, or (one
    answer coming during the reply delay, behind the end) hung until the client's deadline."""
    netns = pod_netns()
    pods = [nodeagent_pb2.AddPodRequest(uid=f"web-{i}", netns_path=netns) for i in range(200)]
    over = [nodeagent_pb2.AddPodRequest(uid=f"x-{i}", netns_path=netns) for i in range(1025)]
    last = (
        b"\xff\xff\xff\xff"
        if refused == "undecodable"
        else nodeagent_pb2.AddPodsRequest(pods=over).SerializeToString()
    )
    with grpc.insecure_channel(f"unix:{server.control_socket}") as channel:
        bulk = channel.stream_stream("/zds.v1.NodeAgent/AddPods")
        requests = [nodeagent_pb2.AddPodsRequest(pods=pods).SerializeToString(), last]
        replies: list[bytes] = []
        with pytest.raises(grpc.RpcError) as info:
            replies.extend(bulk(iter(requests), timeout=20))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value
    answers = [result for data in replies for result in nodeagent_pb2.AddPodsReply.FromString(data).results]
    assert sorted(answer.index for answer in answers) == list(range(200))
    assert len(server.list_pods()) == 200


def test_the_node_is_never_enrolled_whatever_path_leads_to_it(server: NodeAgentProc, tmp_path: Path) -> None:
    """Symlinks, '..' and a host process's /proc/PID/ns/net all end at the same refusal, and
    nothing goes into the node's netns (no rules, nothing cached)."""
    link = f"/var/run/netns/{run_unique('zds-test-link-')}"
    os.symlink(f"/proc/{os.getpid()}/ns/net", link)
    try:
        for path in (
            link,
            f"/var/run/netns/../../../proc/{os.getpid()}/ns/net",
            f"/proc/{os.getpid()}/ns/net",
            "/proc/self/ns/net",
        ):
            with pytest.raises(grpc.RpcError) as info:
                server.add_pod("u1", path)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, path
            assert "is the node agent's own netns" in (info.value.details() or ""), path
    finally:
        os.unlink(link)
    assert server.list_pods() == []
    # pid 1's netns: refused by name, before it is opened (a sandbox may not let it be).
    with pytest.raises(grpc.RpcError) as info:
        server.add_pod("u1", "/proc/1/ns/net")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "netns path /proc/1/ns/net is pid 1's: the node is never enrolled as a pod"
    # ... and through a link: opened, the node's; where even root may not open it (a sandbox's
    # pid 1), that is what is said (it told root to run as root).
    link = f"/var/run/netns/{run_unique('zds-test-pid1-')}"
    os.symlink("/proc/1/ns/net", link)
    try:
        with pytest.raises(grpc.RpcError) as info:
            server.add_pod("u1", link)
    finally:
        os.unlink(link)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    try:
        os.close(os.open("/proc/1/ns/net", os.O_RDONLY))
    except PermissionError:
        assert info.value.details() == (
            f"cannot open netns {link}: permission denied, as root (the kernel or a security module keeps "
            "what it leads to from this process: not a netns the node agent may open)"
        )
    else:
        assert "is the node agent's own netns" in (info.value.details() or "")
    assert server.list_pods() == []


def test_removing_an_unknown_pod_is_not_found(server: NodeAgentProc) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.remove_pod("nope")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


# -- connection health -------------------------------------------------------------


def test_a_missing_ack_closes_the_connection_after_the_deadline(
    start_server: StartServer, peers: Peers
) -> None:
    server = start_server("--ack-timeout", "0.5")
    peer = connect(server, peers)
    thread, result = add_in_thread(server, "u1", pod_netns())
    peer.expect().close_fds()  # ... and never ack
    peer.expect_closed()
    thread.join(10)
    assert isinstance(result["error"], grpc.RpcError)
    assert result["error"].code() is grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_for_output("no ack for add within 0.5s")
    assert "no ack for add: no ack for add" not in server.output()  # (said once)


def test_idle_keepalive_notices_a_peer_that_went_away(start_server: StartServer, peers: Peers) -> None:
    server = start_server("--keepalive-interval", "0.2")
    peer = connect(server, peers)
    server.wait_for_output("total connected: 1")
    peer.close()
    server.wait_for_output("ztunnel disconnected: ztunnel closed the connection; total connected: 0")


def test_an_empty_record_is_said_to_be_one_not_a_close(start_server: StartServer, peers: Peers) -> None:
    """A 0-byte record ends the connection (ztunnel reads one as EOF), but a ztunnel that sent
    one (a WorkloadResponse with no ack encodes to nothing) had not closed: "ztunnel closed
    the connection" sent whoever tests a ztunnel looking for a close that never happened."""
    server = start_server()
    peer = connect(server, peers)
    thread, result = add_in_thread(server, "u1", pod_netns())
    peer.expect().close_fds()
    peer.send(b"")  # (its socket stays open)
    peer.expect_closed()
    thread.join(10)
    assert isinstance(result["error"], grpc.RpcError)
    assert "ztunnel sent an empty record" in str(result["error"].details())
    server.wait_for_output("ztunnel disconnected: ztunnel sent an empty record")
    # While idle too; and a ztunnel that does close is still said to have closed.
    idle = connect(server, peers)
    idle.send(b"")
    idle.expect_closed()
    gone = connect(server, peers)
    gone.close()
    server.wait_for_output("ztunnel disconnected: ztunnel closed the connection")
    said = server.output().count("ztunnel disconnected: ztunnel sent an empty record")
    assert said == 2, server.output()


def test_unprompted_message_while_idle_closes_the_connection(start_server: StartServer, peers: Peers) -> None:
    server = start_server("--keepalive-interval", "0.2")
    peer = connect(server, peers)
    peer.send(encode_ack(Ack()))
    peer.expect_closed()
    server.wait_for_output("unexpected message from ztunnel")


def test_connections_beyond_max_connections_are_refused(start_server: StartServer, peers: Peers) -> None:
    server = start_server("--max-connections", "2")
    connect(server, peers)
    connect(server, peers)
    third = connect(server, peers, snapshot=False)
    third.hello()
    third.expect_closed()
    server.wait_for_output("already 2 connected")


def test_connections_that_never_say_hello_hold_no_place(start_server: StartServer, peers: Peers) -> None:
    server = start_server("--max-connections", "2")
    for _ in range(2):
        peers.raw(server.zds_socket)  # connected, silent
    real = connect(server, peers)  # says hello, gets its snapshot at once
    # (the log line may reach the file a few ms after the snapshot reached the peer)
    wait_until(lambda: server.connected_count() == 1, "the node agent's count of hello'd connections")
    real.close()


def test_with_500_idle_connections_open_a_real_ztunnel_is_served_at_once(
    start_server: StartServer, peers: Peers
) -> None:
    server = start_server("--max-connections", "2", "--hello-timeout", "60")
    idle = [peers.raw(server.zds_socket) for _ in range(500)]
    real = peers.raw(server.zds_socket)
    real.hello()
    got = real.expect(timeout=5)  # served while the flood is still connected
    assert got.payload == bytes.fromhex("1a00")
    real.ack()
    # Only a bounded number of silent ones is kept: the oldest are dropped as more arrive.
    closed: set[int] = set()

    def dropped() -> bool:
        closed.update(
            i for i, peer in enumerate(idle) if i not in closed and peer.recv(timeout=0) is not None
        )
        return len(closed) >= 500 - 64

    wait_until(dropped, "all but 64 of the silent connections dropped")
    assert max(closed) < 499, "the newest silent connection is kept"
    # Said in a line every 10 s, not one each (436 lines of the same, for one flood).
    server.wait_for_output(
        "dropped 1 connection(s) waiting for their hello or their turn: more than 64 were waiting"
    )
    said = [line for line in server.output().splitlines() if "waiting for their hello" in line]
    assert len(said) <= 2, said  # (a second one only if the flood took over 10 s)
    # Every one of them counted, the rest said at the stop (not lost with the 10 s timer).
    dropped()
    assert server.stop() == 0
    counts = re.findall(r"dropped (\d+) connection\(s\) waiting for their hello", server.output())
    assert sum(map(int, counts)) == len(closed) and len(counts) <= 3, counts


async def test_at_most_five_connections_are_accepted_per_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Istio's rate.NewLimiter(5, 1) on the connections that said hello: each is served only
    in its slot, the slots 1/5 s apart. In-process (to see the limiter's decisions and when,
    on the event loop's clock, each connection was served)."""
    from zds import defaults
    from zds.server.agent import AgentConfig, NodeAgent

    loop = asyncio.get_running_loop()
    agent = NodeAgent(AgentConfig(max_connections=20))
    waits: list[tuple[float, float]] = []  # each decision to wait: (when, how long)
    slots = taken_slots(agent, monkeypatch, waits)
    served: list[float] = []  # when each connection was served (said ready in the registry)
    hello = agent.registry.hello

    def serving(conn: Any) -> None:
        served.append(loop.time())
        hello(conn)

    monkeypatch.setattr(agent.registry, "hello", serving)
    path = str(tmp_path / "ztunnel.sock")
    listener, accepting = serve_agent(agent, path)
    peers = [AckingPeer(path) for _ in range(11)]  # 11 hellos at once
    try:
        await async_wait_until(
            lambda: len(agent.connections) == 11 and all(c.snapshot_complete for c in agent.connections),
            "the 11 connections served",
        )
    finally:
        await stop_served_agent(agent, accepting, listener, peers)
    assert len(slots) == len(served) == 11
    # The limiter's decisions: burst 1, then a slot every 1/5 s.
    assert all(
        later - earlier >= 1 / defaults.ACCEPTS_PER_SECOND - 1e-9 for earlier, later in pairwise(slots)
    )
    # None left unused while connections waited: after each slot the limiter waits only until
    # the next (a wait to two slots on would leave one unused). When the wait ends is the
    # loop's scheduling, not the limiter's: a sleep woken late (a loaded machine) is no fault.
    for earlier, later in pairwise(slots):
        between = [when + wait for when, wait in waits if earlier <= when < later]
        until = between[-1] if between else later
        assert until - earlier < 2 / defaults.ACCEPTS_PER_SECOND, "slots left unused between them"
    # Served in them: the k-th served no earlier than the k-th slot was taken (how long after is
    # the loop's scheduling; the slots' spacing above is the limit).
    assert all(at >= slot for at, slot in zip(sorted(served), slots, strict=True))


def say_hello_and_stay(path: str, held: list[socket.socket]) -> None:
    """One more connection to the ZDS socket at ``path`` that says hello and stays open, put in
    ``held`` before it connects (the caller closes every one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    held.append(sock)
    sock.connect(path)
    sock.send(bytes.fromhex("0801"))


def taken_slots(
    agent: Any, monkeypatch: pytest.MonkeyPatch, waits: list[tuple[float, float]] | None = None
) -> list[float]:
    """When (on the loop's clock) each slot of ``agent``'s accept rate was taken, as it comes;
    each decision to wait instead goes into ``waits`` as (when, how long)."""
    from zds.protocol.nodeagent import AcceptLimiter

    taken: list[float] = []
    delay = AcceptLimiter.delay

    def deciding(limiter: AcceptLimiter, now: float) -> float:
        wait = delay(limiter, now)
        if wait == 0:
            taken.append(now)
        elif waits is not None:
            waits.append((now, wait))
        return wait

    monkeypatch.setattr(agent.admission.limiter, "delay", deciding.__get__(agent.admission.limiter))
    return taken


async def test_connections_that_said_hello_and_went_take_no_slot_of_the_rate_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """20 connections that say hello and close at once: each took a slot of the 5-a-second
    limit (a real ztunnel behind them waited 4 s; Istio's limiter, before its accept, makes it
    wait as long) and was announced connected, then failed with a broken pipe."""
    from zds.server.agent import GONE_AFTER_HELLO, AgentConfig, NodeAgent
    from zds.transport import bind_unix_listener

    caplog.set_level(logging.INFO, logger="zds.server")
    agent = NodeAgent(AgentConfig(max_connections=2))
    slots = taken_slots(agent, monkeypatch)
    path = str(tmp_path / "ztunnel.sock")
    listener = bind_unix_listener(path, mode=0o600)
    for _ in range(20):  # (in the backlog, gone, before the node agent accepts them)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as gone:
            gone.connect(path)
            gone.send(bytes.fromhex("0801"))
    accepting = asyncio.create_task(agent.serve_zds(listener))
    peer = AckingPeer(path)
    try:
        await async_wait_until(
            lambda: len(agent.connections) == 1 and all(c.snapshot_complete for c in agent.connections),
            "the real one served",
        )
    finally:
        await stop_served_agent(agent, accepting, listener, [peer])
    assert len(slots) == 1, "only the real one took a slot"
    said = [r.getMessage() for r in caplog.records]
    assert sum(GONE_AFTER_HELLO in line and "closed before it was served" in line for line in said) == 20
    assert sum("ztunnel connected" in line for line in said) == 1


async def test_connections_that_leave_while_waiting_for_their_slot_leave_none_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 connections say hello behind a served one and leave while they wait for their slots
    (one a second here): the real ztunnel after them has the next slot. Each had reserved its
    own at its hello and never given it back: the real one waited 21 slots (N/5 s; 500 such
    held a restarted ztunnel back 98 s)."""
    from zds.server.agent import AgentConfig, NodeAgent

    agent = NodeAgent(AgentConfig(max_connections=2, accepts_per_second=1.0))
    slots = taken_slots(agent, monkeypatch)
    path = str(tmp_path / "ztunnel.sock")
    listener, accepting = serve_agent(agent, path)
    peers = [AckingPeer(path)]
    leaving: list[socket.socket] = []
    try:
        await async_wait_until(lambda: len(slots) == 1, "the first served")
        for _ in range(20):
            say_hello_and_stay(path, leaving)
        await async_wait_until(lambda: len(agent.admission) == 20, "the 20 waiting for their slots")
        for sock in leaving:
            sock.close()
        peers.append(AckingPeer(path))  # (the 21st slot would be 21 s away)
        await async_wait_until(lambda: len(agent.connections) == 2, "the real one served", timeout=10)
        assert len(slots) == 2, "a connection that left took a slot"
    finally:
        for sock in leaving:
            sock.close()
        await stop_served_agent(agent, accepting, listener, peers)


async def test_connections_over_the_limit_are_refused_at_once_and_take_no_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With --max-connections connected, each further hello waited for its slot of the rate
    limit before it was refused (the sixth over the limit 1.2 s after its hello), and took the
    slot: a real ztunnel behind them waited as long."""
    from zds.server.agent import GONE_AFTER_HELLO, AgentConfig, NodeAgent

    agent = NodeAgent(AgentConfig(max_connections=2, accepts_per_second=1.0))
    slots = taken_slots(agent, monkeypatch)
    caplog.set_level(logging.INFO, logger="zds.server")
    path = str(tmp_path / "ztunnel.sock")
    listener, accepting = serve_agent(agent, path)
    peers = [AckingPeer(path)]
    over: list[socket.socket] = []
    try:
        await async_wait_until(lambda: len(agent.connections) == 1, "the first served")
        peers.append(AckingPeer(path))  # (its slot a second after the first's)
        await async_wait_until(lambda: len(agent.connections) == 2, "the second served", timeout=5)
        for _ in range(6):
            say_hello_and_stay(path, over)

        def closed(sock: socket.socket) -> bool:
            try:
                return sock.recv(16, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False

        await async_wait_until(lambda: all(closed(sock) for sock in over), "the six refused", timeout=10)
        assert len(slots) == 2, "a refused connection took a slot"
        said = [r.getMessage() for r in caplog.records if "--max-connections" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(
            "refused 1 ztunnel connection(s): already 2 connected"
        ), said
        # One that said hello and went is no refusal for the limit (nor a warning): it is gone.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as gone:
            gone.connect(path)
            gone.send(bytes.fromhex("0801"))
        await async_wait_until(
            lambda: any(GONE_AFTER_HELLO in r.getMessage() for r in caplog.records), "the one gone said gone"
        )
    finally:
        for sock in over:
            sock.close()
        await stop_served_agent(agent, accepting, listener, peers)


# -- the socket file ------------------------------------------------------------------


def test_socket_file_is_0600_and_a_stale_one_is_replaced(start_server: StartServer, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "ztunnel", "ztunnel.sock")
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(path)
    stale.close()  # leaves the file behind, as a crashed node agent would
    server = start_server()
    assert stat.S_IMODE(os.stat(server.zds_socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.control_socket).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(server.zds_socket).st_mode)
    peer = RawPeer(server.zds_socket)
    peer.hello()
    assert peer.expect().payload == bytes.fromhex("1a00")
    peer.close()


@pytest.mark.parametrize(
    ("which", "kind"),
    [
        ("ztunnel/ztunnel.sock", socket.SOCK_SEQPACKET),
        ("zds/control.sock", socket.SOCK_STREAM),
        ("cni/pluginevent.sock", socket.SOCK_DGRAM),
    ],
)
def test_a_socket_another_program_serves_is_left_alone_and_refused_in_one_line(
    start_server: StartServer, tmp_path: object, which: str, kind: int
) -> None:
    """DESIGN §2: only a stale socket, one nothing answers on, is replaced. Istio's node
    agent at the default path (no zds lock beside it) is a live one: zds refuses to start."""
    path = os.path.join(str(tmp_path), which)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with socket.socket(socket.AF_UNIX, kind) as theirs:
        theirs.bind(path)
        if kind != socket.SOCK_DGRAM:
            theirs.listen()
        inode = os.stat(path).st_ino
        server = start_server(ready=False)
        assert server.proc.wait(15) == 1
        server.wait_for_output(f"{path} is a socket another program serves; refusing to replace it")
        assert "Traceback" not in server.output()
        assert os.stat(path).st_ino == inode
        if kind != socket.SOCK_DGRAM:
            with socket.socket(socket.AF_UNIX, kind) as client:
                client.connect(path)  # still theirs, still answering
        # Refused before the pod store was opened: no state directory, no lock file of its own.
        assert not os.path.exists(server.state_dir)
        assert not [name for name in _files_under(str(tmp_path)) if name.endswith(".lock")]


def test_a_socket_path_whose_directory_is_a_file_is_refused_in_one_line(
    start_server: StartServer, tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("")
    path = tmp_path / "afile" / "z.sock"
    server = start_server("--zds-socket", str(path), ready=False)
    assert server.proc.wait(15) == 1
    server.wait_for_output(f"cannot use {path}: its directory {tmp_path / 'afile'}: not a directory")
    assert "Traceback" not in server.output()
    assert not os.path.exists(server.state_dir)


def test_a_start_refused_once_its_pod_store_was_made_leaves_nothing_and_the_next_start_works(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A full disk at the first start left an empty pods.db and a zds.lock: every later start
    was refused ("empty, but its state directory was used by a node agent before") until
    someone passed --reset-state."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "zds-test", str(disk)], check=True)
    try:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):  # the disk full
            while True:
                f.write(b"x" * 4096)
        state = disk / "state"
        server = start_server("--state-dir", str(state), ready=False)
        assert server.proc.wait(15) == 1
        assert "pod store" in server.output() and "Traceback" not in server.output()
        assert not state.exists(), "the refused start left its state directory (pods.db, zds.lock)"
        assert not [name for name in _files_under(str(tmp_path)) if name.endswith(".lock")]
        filler.unlink()
        again = start_server("--state-dir", str(state), name="again")  # ready: it started
        assert (state / "pods.db").exists() and (state / "zds.lock").exists()
        assert again.stop() == 0
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.mark.parametrize("which", ["ztunnel/ztunnel.sock", "zds/control.sock", "cni/pluginevent.sock"])
def test_a_regular_file_at_a_socket_path_survives_and_is_refused_in_one_line(
    start_server: StartServer, tmp_path: object, which: str
) -> None:
    # Istio os.Remove()s whatever is at the path; zds only ever replaces a stale socket.
    path = os.path.join(str(tmp_path), which)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("somebody's data")
    server = start_server(ready=False)
    assert server.proc.wait(15) == 1
    server.wait_for_output(f"{path} is not a socket; refusing to replace it with a socket")
    assert "Traceback" not in server.output()
    with open(path) as f:
        assert f.read() == "somebody's data"
    # Refused before anything was claimed: it made a state directory, a pod store and lock files.
    assert not os.path.exists(server.state_dir)
    assert not [name for name in _files_under(str(tmp_path)) if name.endswith(".lock")]


def _files_under(top: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(top) for f in files]


@pytest.mark.parametrize("which", ["ztunnel/ztunnel.sock", "zds/control.sock"])
def test_a_directory_at_a_socket_path_is_refused_in_one_line(
    start_server: StartServer, tmp_path: object, which: str
) -> None:
    os.makedirs(os.path.join(str(tmp_path), which))
    server = start_server(ready=False)
    assert server.proc.wait(15) == 1
    server.wait_for_output("is a directory; refusing to replace it with a socket")
    assert "Traceback" not in server.output()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--http-listen", "foo"], "--http-listen 'foo': expected HOST:PORT"),
        # (the kernel took 99999 as 34463)
        (["--http-listen", "127.0.0.1:99999"], "port 99999 is not a TCP port (0-65535)"),
        # (its directory, its lock and the pod store were made first)
        (["--zds-socket", "{tmp}/" + "d" * 100 + "/z.sock"], "longer than a unix socket path may be (107)"),
        (["--zds-socket", ""], "--zds-socket: give a path (an empty one names no socket)"),  # (ENOENT)
        # (gRPC's codec refused it once the pod store was made)
        (
            ["--control-socket", "{tmp}/zds/\udcff.sock"],
            "--control-socket {tmp}/zds/\\xff.sock: not UTF-8 text, and gRPC serves only a UTF-8 path "
            "(its socket .private/grpc.sock beside it); give a UTF-8 path",
        ),
        (["--grpc-listen", "127.0.0.1:0"], "--grpc-listen"),  # neither TLS nor --grpc-insecure
        (
            ["--cni-socket", "{tmp}/zds/./control.sock"],
            "--control-socket and --cni-socket are the same path {tmp}/zds/./control.sock: "
            "give each socket its own",
        ),
        (["--pods", "{tmp}/pods.yaml"], "neither JSON lines nor valid YAML"),
        (["--faults", "{tmp}/faults.jsonl"], "--faults {tmp}/faults.jsonl: "),
    ],
)
def test_a_flag_naming_something_bad_stops_the_start_before_anything_is_written(
    start_server: StartServer, tmp_path: Path, flags: list[str], says: str
) -> None:
    """Found only once the pod store (and, for files, the lock files and sockets) were made."""
    (tmp_path / "pods.yaml").write_text("pods: [\n")
    (tmp_path / "faults.jsonl").write_text('{"kind": "no-such-fault"}\n')
    server = start_server(*(f.format(tmp=tmp_path) for f in flags), ready=False)
    assert server.proc.wait(15) == 1
    server.wait_for_output(says.format(tmp=tmp_path))
    assert "Traceback" not in server.output()
    assert not os.path.exists(server.state_dir), os.listdir(server.state_dir)
    for path in (server.zds_socket, server.control_socket, server.cni_socket):
        assert not os.path.lexists(path) and not os.path.lexists(path + ".lock")


def test_a_control_socket_path_that_is_not_utf8_and_long_is_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The gRPC socket beside a path that long is bound and dialled through the node agent's
    fd of its directory (/proc/self/fd/N/grpc.sock), whatever bytes the path holds: taken."""
    public = os.fsencode(tmp_path) + b"/" + b"c" * (100 - len(os.fsencode(tmp_path))) + b"\xff.sock"
    server = start_server("--control-socket", os.fsdecode(public))
    link = tmp_path / "control.sock"
    link.symlink_to(os.fsdecode(public))  # (zds's client commands take UTF-8 paths only)
    done = subprocess.run(
        [*ZDS, "pod", "list", "--control-socket", str(link)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in server.output()


@pytest.mark.parametrize(
    ("mode", "owner", "says"),
    [
        (0o777, 0, "mode 0777"),
        (0o1777, 0, "mode 1777"),
        (0o770, 0, "mode 0770"),
        (0o700, 65534, "owned by another user"),
    ],
    ids=["0777", "1777", "0770", "another-owner"],
)
def test_a_state_directory_others_can_write_is_refused_before_anything_is_written(
    start_server: StartServer, tmp_path: Path, mode: int, owner: int, says: str
) -> None:
    """Whoever can write it could put a pod store of their own there (netns paths that get
    rules and go to ztunnel)."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    os.chown(state, owner, -1)
    server = start_server(ready=False)
    assert server.proc.wait(15) == 1
    server.wait_for_output(f"cannot use state directory {state}: others can write it ({says}); ")
    assert "Traceback" not in server.output()
    assert os.listdir(state) == [] and state.stat().st_mode & 0o7777 == mode  # left as it was
    for path in (server.zds_socket, server.control_socket, server.cni_socket):
        assert not os.path.lexists(path) and not os.path.lexists(path + ".lock")


@pytest.mark.parametrize(
    ("name", "mode", "owner", "says"),
    [("pods.db", 0o600, 65534, "owned by another user"), ("pods.db-wal", 0o666, 0, "mode 0666")],
)
def test_a_pod_store_others_can_write_is_refused_and_left_as_it_was(
    start_server: StartServer, tmp_path: Path, name: str, mode: int, owner: int, says: str
) -> None:
    """The directory was checked, not its files: a pods.db another user owned was used, and
    that user could put in it the namespaces that get rules (and go to ztunnel)."""
    first = start_server()
    first.stop()
    path = Path(first.state_dir) / name
    path.touch()
    path.chmod(mode)
    os.chown(path, owner, -1)
    again = start_server(ready=False, name="again")
    assert again.proc.wait(15) == 1
    again.wait_for_output(f"cannot use the pod store's {path}: others can write it ({says}), ")
    assert path.stat().st_uid == owner and path.stat().st_mode & 0o7777 == mode


def test_sigterm_stops_cleanly_and_removes_the_sockets(server: NodeAgentProc) -> None:
    assert server.stop() == 0
    for path in (server.zds_socket, server.control_socket, server.cni_socket):
        assert not os.path.exists(path)


def test_a_socket_directory_the_agent_made_stays_for_a_bind_mount_of_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A ztunnel container bind-mounts the ZDS socket's directory: removed at a stop and made
    anew at the next start, the mount would show the removed one, and that ztunnel would
    never find the socket again (Istio's agent leaves the directory)."""
    server = start_server()
    made = os.path.dirname(server.zds_socket)
    mounted = tmp_path / "ztunnel-container-view"
    mounted.mkdir()
    subprocess.run(["mount", "--bind", made, str(mounted)], check=True)
    try:
        assert server.stop() == 0
        for path in (server.zds_socket, server.control_socket, server.cni_socket):
            assert os.path.isdir(os.path.dirname(path)) and not os.path.lexists(path)
            assert not os.path.lexists(path + ".lock")
        again = start_server(name="again")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as ztunnel:
            ztunnel.connect(str(mounted / "ztunnel.sock"))
        assert again.stop() == 0
    finally:
        subprocess.run(["umount", str(mounted)], check=True)


def test_sighup_stops_it_as_sigterm_does(server: NodeAgentProc) -> None:
    # (the terminal or ssh session it ran in went away: it died with its sockets left)
    server.proc.send_signal(signal.SIGHUP)
    assert server.proc.wait(30) == 0
    assert "node agent stopped" in server.output()
    for path in (server.zds_socket, server.control_socket, server.cni_socket):
        assert not os.path.exists(path)


# -- fds -----------------------------------------------------------------------------


def test_replacing_a_pod_closes_its_old_netns_fd(server: NodeAgentProc, make_pod: Callable[[], Pod]) -> None:
    def add(stub: Any, netns: str) -> None:
        request = nodeagent_pb2.AddPodRequest(uid="u1", name="a", namespace="ns", netns_path=netns)
        with pytest.raises(grpc.RpcError):  # no ztunnel: cached, UNAVAILABLE
            stub.AddPod(request, timeout=30)

    other = make_pod().path
    with server.control() as stub:
        add(stub, pod_netns())
        baseline = fd_count(server.pid)
        for netns in (other, pod_netns(), other):
            add(stub, netns)
        assert fd_count(server.pid) == baseline
        [pod] = stub.ListPods(nodeagent_pb2.ListPodsRequest(), timeout=30).pods
        assert pod.netns.ino == os.stat(other).st_ino


@pytest.mark.slow
def test_thousand_pods_enrolled_and_removed_leave_no_fd_behind(server: NodeAgentProc, peers: Peers) -> None:
    peer = connect(server, peers)
    stop = threading.Event()
    acked = {"add": 0, "del": 0}

    def ztunnel() -> None:
        while not stop.is_set():
            got = peer.recv(timeout=0.1)
            if got is None:
                continue
            if not got.payload:
                return
            acked["add" if got.fds else "del"] += 1
            got.close_fds()
            peer.ack()

    thread = threading.Thread(target=ztunnel, daemon=True)
    thread.start()
    try:
        with server.control() as stub:
            # warm up gRPC's own fds before taking the baseline
            stub.ListPods(nodeagent_pb2.ListPodsRequest(), timeout=30)
            baseline = fd_count(server.pid)
            for i in range(1000):
                stub.AddPod(
                    nodeagent_pb2.AddPodRequest(
                        uid=f"u{i}", name=f"p{i}", namespace="ns", netns_path=pod_netns()
                    ),
                    timeout=30,
                )
            assert fd_count(server.pid) >= baseline + 1000  # each cached pod holds its netns open
            for i in range(1000):
                stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid=f"u{i}"), timeout=30)
            assert fd_count(server.pid) == baseline
    finally:
        stop.set()
        thread.join(5)
    assert acked == {"add": 1000, "del": 1000}


# -- CNI plugin endpoint ----------------------------------------------------------------


def test_cni_add_event_enrolls_the_pod_with_a_derived_uid(server: NodeAgentProc, peers: Peers) -> None:
    peer = connect(server, peers)
    body = json.dumps({"Netns": pod_netns(), "PodName": "web", "PodNamespace": "shop", "IPs": []}).encode()
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(answer=post_unix(server.cni_socket, "/cmdadd", body))
    )
    thread.start()
    got = peer.expect()
    request = request_of(got)
    got.close_fds()
    peer.ack()
    thread.join(10)
    assert result["answer"] == (200, "")
    assert isinstance(request, AddWorkload)
    assert request.info == WorkloadInfo("web", "shop", "default")
    again = json.dumps({"Netns": pod_netns(), "PodName": "web", "PodNamespace": "shop"}).encode()
    thread = threading.Thread(
        target=lambda: result.update(answer=post_unix(server.cni_socket, "/cmdadd", again))
    )
    thread.start()
    second = peer.expect()
    second.close_fds()
    peer.ack()
    thread.join(10)
    again_request = request_of(second)
    assert isinstance(again_request, AddWorkload)
    assert again_request.uid == request.uid  # stable derivation


def test_cni_event_with_explicit_uid_and_service_account(server: NodeAgentProc, peers: Peers) -> None:
    peer = connect(server, peers)
    body = json.dumps(
        {
            "Netns": pod_netns(),
            "PodName": "web",
            "PodNamespace": "shop",
            "PodUID": "abc",
            "ServiceAccount": "web-sa",
        }
    ).encode()
    thread = threading.Thread(target=post_unix, args=(server.cni_socket, "/cmdadd", body))
    thread.start()
    got = peer.expect()
    got.close_fds()
    peer.ack()
    thread.join(10)
    assert request_of(got) == AddWorkload("abc", WorkloadInfo("web", "shop", "web-sa"))


def test_an_istio_cni_event_never_replaces_or_removes_a_pod_another_source_enrolled(
    server: NodeAgentProc, peers: Peers
) -> None:
    """Istio's plugin event (no container id) names a uid the control API enrolled: refused
    and left alone, as zds-cni's own events are (one source never takes another's pod)."""
    peers.acking(server.zds_socket).wait_snapshot()
    netns = pod_netns()
    server.add_pod("api-pod", netns, name="web", namespace="shop")
    body = json.dumps({"Netns": netns, "PodName": "other", "PodNamespace": "x", "PodUID": "api-pod"}).encode()
    status, answer = post_unix(server.cni_socket, "/cmdadd", body)
    assert (status, answer.strip()) == (500, "uid api-pod is held by a pod from api; not replaced")
    status, answer = post_unix(server.cni_socket, "/cmddel", json.dumps({"PodUID": "api-pod"}).encode())
    assert (status, answer.strip()) == (200, "left alone: enrolled by api")
    [pod] = server.list_pods()
    assert (pod.uid, pod.name, pod.namespace) == ("api-pod", "web", "shop")


def test_a_cni_del_naming_the_pods_netns_another_way_removes_it_and_a_stale_one_does_not(
    server: NodeAgentProc, peers: Peers, make_pod: Callable[[], Pod]
) -> None:
    """An ADD's ``Netns`` is read as a bare name or a path, spaces around it, and a DEL's was
    compared as it came: a DEL naming the pod's netns as its ADD did (a bare name), with a
    space, or under /run for /var/run left the pod and its rules enrolled (review, MED).
    A DEL naming another netns (a container's earlier one) still leaves it alone."""
    peers.acking(server.zds_socket).wait_snapshot()
    pod = make_pod()
    assert pod.path == f"/var/run/netns/{pod.name}"
    for added, deleted in (
        (pod.name, pod.name),
        (pod.path, f" {pod.path} "),
        (pod.path, f"/run/netns/{pod.name}"),
    ):
        add = {"Netns": added, "PodName": "web", "PodNamespace": "shop", "PodUID": "cni-pod"}
        assert post_unix(server.cni_socket, "/cmdadd", json.dumps(add).encode()) == (200, "")
        stale = {"PodUID": "cni-pod", "Netns": "/var/run/netns/gone-long-ago"}
        status, answer = post_unix(server.cni_socket, "/cmddel", json.dumps(stale).encode())
        assert (status, answer.strip()) == (200, f"left alone: enrolled in {pod.path}, not {stale['Netns']}")
        status, answer = post_unix(
            server.cni_socket, "/cmddel", json.dumps({"PodUID": "cni-pod", "Netns": deleted}).encode()
        )
        assert (status, answer.strip()) == (200, "removed"), (added, deleted)
        assert server.list_pods() == []
    # A Netns no ADD could have named is refused in one line (it was a traceback and a bare 500).
    add = {"Netns": pod.path, "PodName": "web", "PodNamespace": "shop", "PodUID": "cni-pod"}
    assert post_unix(server.cni_socket, "/cmdadd", json.dumps(add).encode()) == (200, "")
    for odd, says in (
        ("/var/run/netns/a\x1bb", "has a character that is not printable"),
        ("/var/ru\0n/netns/x", "a path has no NUL byte"),
    ):
        status, answer = post_unix(
            server.cni_socket, "/cmddel", json.dumps({"PodUID": "cni-pod", "Netns": odd}).encode()
        )
        assert status == 400 and says in answer and answer.count("\n") == 1, answer
    check = json.dumps({**add, "Netns": "/var/ru\0n/netns/x"}).encode()
    status, answer = post_unix(server.cni_socket, "/cmdcheck", check)
    assert status == 500 and answer.startswith(f"pod cni-pod is enrolled in {pod.path}, not "), answer
    blank = json.dumps({"PodUID": "cni-pod", "Netns": "   "}).encode()  # (as none: whichever it is in)
    assert post_unix(server.cni_socket, "/cmddel", blank) == (200, "removed\n")
    assert "Traceback" not in server.output()


def test_a_cni_check_fails_once_the_pods_netns_is_not_the_one_at_its_path(
    server: NodeAgentProc, peers: Peers, make_pod: Callable[[], Pod]
) -> None:
    """CHECK compared paths only: a netns deleted and made again under the pod's name (rules
    and listeners gone with the old one) still checked as enrolled (review, LOW)."""
    from zds.netns.fixtures import create_netns, delete_netns

    peers.acking(server.zds_socket).wait_snapshot()
    pod = make_pod()
    event = json.dumps({"Netns": pod.path, "PodName": "web", "PodNamespace": "shop", "PodUID": "cni-pod"})
    assert post_unix(server.cni_socket, "/cmdadd", event.encode()) == (200, "")
    assert post_unix(server.cni_socket, "/cmdcheck", event.encode()) == (200, "enrolled\n")
    at_run = event.replace("/var/run/", "/run/")
    assert post_unix(server.cni_socket, "/cmdcheck", at_run.encode()) == (200, "enrolled\n")
    delete_netns(pod.name)
    create_netns(pod.name)
    status, answer = post_unix(server.cni_socket, "/cmdcheck", event.encode())
    assert (status, answer.strip()) == (
        500,
        f"pod cni-pod is enrolled in a netns that is no longer at {pod.path}",
    )


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"Netns": "/x", "PodName": 3, "PodNamespace": "shop"}).encode(), "PodName"),
    ],
)
def test_cni_malformed_body_is_400(server: NodeAgentProc, body: bytes, text: str) -> None:
    status, answer = post_unix(server.cni_socket, "/cmdadd", body)
    assert status == 400 and text in answer


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b"{}", "Netns is missing or empty"),
        (b"null", "Netns is missing or empty"),
        (json.dumps({"PodName": "web", "PodNamespace": "shop"}).encode(), "Netns is missing or empty"),
        (json.dumps({"Netns": "/x", "PodName": "", "PodNamespace": "shop"}).encode(), "PodName is missing"),
        (
            json.dumps({"Netns": "/var/run/netns/a\x1bb", "PodName": "web", "PodNamespace": "shop"}).encode(),
            "Netns: ",
        ),
    ],
)
def test_cni_body_that_decodes_but_names_nothing_usable_is_500(
    server: NodeAgentProc, body: bytes, text: str
) -> None:
    """Istio answers 400 only to a body its decode refuses (cni-watcher.go); ``{}`` decodes, and
    fails its pod lookup: 500."""
    status, answer = post_unix(server.cni_socket, "/cmdadd", body)
    assert status == 500 and text in answer, (status, answer)


def test_cni_failed_enrollment_is_500_with_the_reason(server: NodeAgentProc) -> None:
    body = json.dumps({"Netns": pod_netns(), "PodName": "web", "PodNamespace": "shop"}).encode()
    status, answer = post_unix(server.cni_socket, "/cmdadd", body)
    assert status == 500 and "no ztunnel connection" in answer
    body = json.dumps(
        {"Netns": "/var/run/netns/zds-never-made", "PodName": "web", "PodNamespace": "shop"}
    ).encode()
    status, answer = post_unix(server.cni_socket, "/cmdadd", body)
    assert status == 500 and "/var/run/netns/zds-never-made" in answer


class _NoPods:
    """A snapshot of no pods."""

    def snapshot_uids(self) -> list[str]:
        return []

    def snapshot_item(self, uid: str) -> None:
        return None


async def _accepted() -> str:
    return ""


async def test_a_ztunnel_that_answers_but_never_reads_is_dropped_at_the_ack_deadline() -> None:
    """Istio's node agent sets a write deadline (5 s, the ack timeout) on each send. A peer that
    sent acks without reading what came filled the socket, and the node agent's write waited
    for room for good: that connection's task, and every removal (sent to every connection)
    with it, for as long as the peer stayed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        conn = ZtunnelConnection(
            SeqpacketConnection(ours), observer=ConnectionObserver(), busy_poll=0.0, ack_timeout=0.5
        )
        served = asyncio.ensure_future(conn.serve(_NoPods(), _accepted))
        theirs.send(encode_hello())
        await asyncio.to_thread(theirs.recv, 4096)  # SnapshotSent
        stop = threading.Event()

        def blind_acks() -> None:  # an ack every millisecond, nothing read
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    theirs.send(encode_ack(Ack(error="")), socket.MSG_DONTWAIT)
                stop.wait(0.001)

        acker = threading.Thread(target=blind_acks)
        acker.start()
        try:
            sent = [asyncio.ensure_future(conn.deliver(DelWorkload(uid=f"u{i}"))) for i in range(5000)]
            reason = await asyncio.wait_for(served, 30)
        finally:
            stop.set()
            acker.join()
        assert reason == "no room to write del for 0.5s: ztunnel is not reading"
        acked = sum(1 for s in sent if s.done() and not s.cancelled() and s.exception() is None)
        assert 0 < acked < len(sent)  # the first ones went through, the rest were dropped
        for s in sent[acked + 1 :]:
            with pytest.raises(ConnectionLost):
                await s


async def test_a_fault_written_to_a_ztunnel_that_never_reads_ends_at_the_ack_deadline_too() -> None:
    """``zds fault``'s records (written twice, before the hello, ...) go through faultplay's own
    write: it waits for room no longer than the connection's ordinary sends do."""
    from zds.server import faultplay

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        conn = ZtunnelConnection(
            SeqpacketConnection(ours), observer=ConnectionObserver(), busy_poll=0.0, ack_timeout=0.2
        )
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:  # ztunnel's queue full: it reads nothing
                ours.send(b"\x0a\x00" * 100)
        request = DelWorkload(uid="zds-fault-before-hello")
        with pytest.raises(ConnectionLost) as lost:
            await asyncio.wait_for(faultplay._write(conn, request, b"\x12\x00", []), 10)
        assert lost.value.reason == "write failed: no room to write for 0.2s: the peer does not read"


async def test_a_connection_closed_while_it_waits_for_an_ack_ends_at_what_comes_next() -> None:
    """The node agent's stop closes every connection's protocol, then cancels their tasks one
    by one. One waiting for an ack meanwhile reads the peer's EOF: it ends there, said as the
    stop's reason, instead of reading that EOF again and again without ever awaiting (the
    stop then never had the event loop back: 100% CPU, only SIGKILL ended it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        sock = SeqpacketConnection(ours)
        reads = 0
        try_recv = sock.try_recv

        def counted(max_size: int = 64 * 1024) -> Record | None:
            nonlocal reads
            reads += 1
            if reads > 100:
                raise RuntimeError("read the same EOF over and over")
            return try_recv(max_size)

        sock.try_recv = counted  # type: ignore[method-assign]
        conn = ZtunnelConnection(sock, observer=ConnectionObserver(), busy_poll=0.0)
        served = asyncio.ensure_future(conn.serve(_NoPods(), _accepted))
        theirs.send(encode_hello())
        await asyncio.to_thread(theirs.recv, 4096)  # SnapshotSent
        theirs.send(encode_ack(Ack(error="")))
        sent = asyncio.ensure_future(conn.deliver(DelWorkload(uid="u1")))
        await asyncio.to_thread(theirs.recv, 4096)  # the DelWorkload, never acked
        conn.protocol.close("node agent stopping")  # as NodeAgent.close_connections does
        theirs.shutdown(socket.SHUT_WR)  # ztunnel gone: EOF
        assert await asyncio.wait_for(served, 10) == "node agent stopping"
        with pytest.raises(ConnectionLost, match="node agent stopping"):
            await sent
        assert reads < 100
