"""Watch: a real `zds server`, watched over gRPC and with `zds watch`, while a
raw-socket ztunnel stand-in connects, acks and nacks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest

from tests.harness import (
    ZDS,
    NodeAgentProc,
    StartServer,
    WatchStream,
    async_wait_until,
    pod_netns,
    wait_until,
)
from tests.standins import Peers
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc

pytestmark = pytest.mark.root

K = nodeagent_pb2


@pytest.fixture
def server(start_server: StartServer) -> NodeAgentProc:
    """A node agent that notices a ztunnel gone within 0.2 s (the keepalive probe)."""
    return start_server("--keepalive-interval", "0.2")


@pytest.fixture
def streams() -> Iterator[list[WatchStream]]:
    made: list[WatchStream] = []
    yield made
    for stream in made:
        stream.close()


def add(server: NodeAgentProc, uid: str, **kw: str) -> Any:
    try:
        return server.add_pod(uid, pod_netns(), **kw)
    except grpc.RpcError as exc:
        return exc


def enroll_from_file(server: NodeAgentProc, tmp_path: object, count: int) -> None:
    """``count`` pods through one ``zds pod add --from-file`` (the bulk path), all acked."""
    path = os.path.join(str(tmp_path), "pods.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"uid": f"pod-{i:04d}", "name": f"p{i}", "netns": pod_netns()}) + "\n")
    enroll = subprocess.run(
        [*ZDS, "pod", "add", "--from-file", path, "--control-socket", server.control_socket],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert enroll.returncode == 0, enroll.stderr


def kinds(events: list[nodeagent_pb2.Event]) -> list[str]:
    return [K.EventKind.Name(e.kind).removeprefix("EVENT_KIND_") for e in events]


# -- the gRPC stream --------------------------------------------------------------------


def test_watch_starts_with_the_current_state_then_a_marker_then_live_events(
    server: NodeAgentProc, peers: Peers, streams: list[WatchStream]
) -> None:
    peers.acking(server.zds_socket)
    add(server, "u1", name="web", namespace="shop")
    add(server, "u2", name="db", namespace="shop")
    before = time.time()
    stream = WatchStream(server)
    streams.append(stream)
    marker = stream.wait_for(K.EVENT_KIND_CURRENT_STATE_END)[0]
    state = stream.events[: stream.events.index(marker)]
    assert sorted(kinds(state)) == ["POD_ENROLLED", "POD_ENROLLED", "ZTUNNEL_CONNECTED"]
    assert all(e.current_state and e.sequence == 0 for e in state)
    pods = {e.uid: e for e in state if e.kind == K.EVENT_KIND_POD_ENROLLED}
    assert (pods["u1"].pod_name, pods["u1"].pod_namespace) == ("web", "shop")
    assert pods["u1"].pod.state == K.POD_STATE_ACKED  # as it is now, not as it was when enrolled
    assert pods["u1"].time.ToNanoseconds() / 1e9 <= before  # when it was enrolled
    [conn] = [e for e in state if e.kind == K.EVENT_KIND_ZTUNNEL_CONNECTED]
    assert conn.connection.peer.pid == os.getpid() and conn.connection.hello_version == 1
    assert conn.connection.newest and conn.connection_id == conn.connection.id
    assert not marker.current_state and marker.sequence > 0

    add(server, "u3", name="cache", namespace="shop")
    server.remove_pod("u1")
    stream.wait_for(K.EVENT_KIND_MESSAGE_ACKED, uid="u1", message_type="del")
    live = stream.live()
    assert kinds(live) == [
        "POD_ENROLLED",
        "MESSAGE_SENT",
        "MESSAGE_ACKED",
        "POD_REMOVED",
        "MESSAGE_SENT",
        "MESSAGE_ACKED",
    ]
    assert [e.uid for e in live] == ["u3", "u3", "u3", "u1", "u1", "u1"]
    assert [e.message_type for e in live if e.message_type] == ["add", "add", "del", "del"]
    assert all(e.connection_id == conn.connection_id for e in live if e.message_type)
    assert live[0].pod.name == "cache" and live[0].pod.state == K.POD_STATE_PENDING
    assert live[3].pod_name == "web" and live[5].pod_namespace == "shop"  # a removed pod keeps its name
    assert live[2].HasField("ack_latency") and live[2].ack_latency.ToNanoseconds() > 0
    # every live event of the node agent, in order, none missing
    assert [e.sequence for e in live] == list(range(marker.sequence + 1, marker.sequence + 7))
    assert all(before <= e.time.ToNanoseconds() / 1e9 <= time.time() for e in live)


def test_nacks_snapshots_and_disconnections_are_events(
    server: NodeAgentProc, peers: Peers, streams: list[WatchStream]
) -> None:
    stream = WatchStream(server)
    streams.append(stream)
    stream.wait_for(K.EVENT_KIND_CURRENT_STATE_END)
    with pytest.raises(grpc.RpcError):
        server.add_pod("u1", pod_netns())  # no ztunnel yet: cached, goes out in the snapshot
    first = peers.acking(server.zds_socket, nack={"u2": "failure to start proxy : port taken"})
    [connected] = stream.wait_for(K.EVENT_KIND_ZTUNNEL_CONNECTED)
    conn_id = connected.connection_id
    [snapshot] = stream.wait_for(K.EVENT_KIND_SNAPSHOT_COMPLETE)
    assert snapshot.connection_id == conn_id and snapshot.snapshot_pods == 1
    sent = stream.wait_for(K.EVENT_KIND_MESSAGE_SENT, connection_id=conn_id)
    assert [(e.message_type, e.uid) for e in sent] == [("add", "u1"), ("snapshot_sent", "")]

    assert isinstance(add(server, "u2"), grpc.RpcError)
    [nack] = stream.wait_for(K.EVENT_KIND_MESSAGE_NACKED)
    assert (nack.uid, nack.message_type, nack.connection_id) == ("u2", "add", conn_id)
    assert nack.error == "failure to start proxy : port taken"

    first.close()  # EOF: found by the keepalive probe
    [gone] = stream.wait_for(K.EVENT_KIND_ZTUNNEL_DISCONNECTED)
    assert gone.connection_id == conn_id and gone.error
    assert gone.connection.state == K.CONNECTION_STATE_CLOSED
    assert gone.connection.messages.nacked == 1 and gone.connection.messages.acked == 2


def test_watch_filters_by_kind_and_by_uid(
    server: NodeAgentProc, peers: Peers, streams: list[WatchStream]
) -> None:
    peers.acking(server.zds_socket)
    add(server, "u0")
    enrolled = WatchStream(server, nodeagent_pb2.WatchRequest(kinds=[K.EVENT_KIND_POD_ENROLLED]))
    about_u2 = WatchStream(server, nodeagent_pb2.WatchRequest(uid="u2"))
    streams += [enrolled, about_u2]
    for stream in streams:
        stream.wait_for(K.EVENT_KIND_CURRENT_STATE_END)
    add(server, "u1")
    add(server, "u2")
    server.remove_pod("u2")
    enrolled.wait_for(K.EVENT_KIND_POD_ENROLLED, uid="u2")
    about_u2.wait_for(K.EVENT_KIND_MESSAGE_ACKED, message_type="del")
    assert kinds(enrolled.events) == ["POD_ENROLLED", "CURRENT_STATE_END", "POD_ENROLLED", "POD_ENROLLED"]
    assert [e.uid for e in enrolled.events] == ["u0", "", "u1", "u2"]
    assert kinds(about_u2.live()) == [
        "POD_ENROLLED",
        "MESSAGE_SENT",
        "MESSAGE_ACKED",
        "POD_REMOVED",
        "MESSAGE_SENT",
        "MESSAGE_ACKED",
    ]
    assert kinds(about_u2.events[:1]) == ["CURRENT_STATE_END"]  # u2 did not exist yet


def test_an_unknown_kind_is_invalid_argument(server: NodeAgentProc) -> None:
    with server.control() as stub, pytest.raises(grpc.RpcError) as info:
        unknown = cast(nodeagent_pb2.EventKind, 42)  # no such kind, on purpose
        list(stub.Watch(nodeagent_pb2.WatchRequest(kinds=[unknown]), timeout=10))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "EVENT_KIND_POD_ENROLLED" in (info.value.details() or "")


def test_a_watch_for_a_uid_no_pod_can_have_or_with_more_kinds_than_there_are_is_refused(
    server: NodeAgentProc,
) -> None:
    """A Watch's uid and kinds were taken as they came: 128 watchers of a 4 MB uid each held
    1.5 GB in the node agent, and millions of kinds were gone through on its event loop (0.5 s
    a request). Both are refused before anything is kept; a RemovePod of such a uid, which no
    pod can have, is refused too (its status echoed the uid, newlines and all)."""
    with server.control() as stub:
        for request, said in [
            (nodeagent_pb2.WatchRequest(uid="u" * 4096), "cannot watch: pod uid 'uuuu"),
            (nodeagent_pb2.WatchRequest(uid="a\nb"), "cannot watch: pod uid 'a\\nb' has characters"),
            (
                nodeagent_pb2.WatchRequest(kinds=[nodeagent_pb2.EVENT_KIND_POD_ENROLLED] * 65),
                "cannot watch 65 event kinds: at most 64 (there are ",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Watch(request, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (info.value.details() or "").startswith(said), info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid="evil\n2026 error forged"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "\n" not in (info.value.details() or ""), info.value.details()
        assert server.proc.poll() is None


def test_a_late_watcher_agrees_with_one_that_watched_from_the_start(
    server: NodeAgentProc, peers: Peers, streams: list[WatchStream]
) -> None:
    early = WatchStream(server)
    streams.append(early)
    early.wait_for(K.EVENT_KIND_CURRENT_STATE_END)
    peers.acking(server.zds_socket)
    for i in range(6):
        add(server, f"u{i}")
    for i in (1, 3):
        server.remove_pod(f"u{i}")
    peers.acking(server.zds_socket)  # a second ztunnel: snapshot, then newest
    early.wait_for(K.EVENT_KIND_SNAPSHOT_COMPLETE, count=2)

    late = WatchStream(server)
    streams.append(late)
    marker = late.wait_for(K.EVENT_KIND_CURRENT_STATE_END)[0]
    # What the early watcher learnt from events, up to the late watcher's marker...
    pods: set[str] = set()
    conns: set[str] = set()
    for e in early.events:
        if e.current_state or e.sequence > marker.sequence:
            continue
        if e.kind == K.EVENT_KIND_POD_ENROLLED:
            pods.add(e.uid)
        elif e.kind == K.EVENT_KIND_POD_REMOVED:
            pods.discard(e.uid)
        elif e.kind == K.EVENT_KIND_ZTUNNEL_CONNECTED:
            conns.add(e.connection_id)
        elif e.kind == K.EVENT_KIND_ZTUNNEL_DISCONNECTED:
            conns.discard(e.connection_id)
    # ... is exactly the late watcher's current state.
    state = late.events[: late.events.index(marker)]
    assert {e.uid for e in state if e.kind == K.EVENT_KIND_POD_ENROLLED} == pods == {"u0", "u2", "u4", "u5"}
    assert {e.connection_id for e in state if e.kind == K.EVENT_KIND_ZTUNNEL_CONNECTED} == conns
    assert len(conns) == 2
    newest = [
        e.connection_id for e in state if e.kind == K.EVENT_KIND_ZTUNNEL_CONNECTED and e.connection.newest
    ]
    assert newest == [early.wait_for(K.EVENT_KIND_ZTUNNEL_CONNECTED, count=2)[1].connection_id]


def test_a_stalled_watcher_is_ended_with_resource_exhausted_and_never_slows_enrollment(
    server: NodeAgentProc, peers: Peers, tmp_path: object
) -> None:
    peers.acking(server.zds_socket)
    # A client that never reads. BDP probing off keeps its HTTP/2 window at the
    # default 64 KiB, so the stream stalls within a few hundred events rather
    # than after megabytes of the client library's own buffering.
    channel = grpc.insecure_channel(f"unix:{server.control_socket}", options=[("grpc.http2.bdp_probe", 0)])
    try:
        stub = nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]
        stalled = stub.Watch(nodeagent_pb2.WatchRequest())
        stalled.initial_metadata()  # the server has subscribed it and written the current state
        # 1000 enrollments, each 3 events (enrolled, sent, acked): far past the
        # default queue of 1024 events plus what HTTP/2 holds.
        enroll_from_file(server, tmp_path, 1000)
        assert len(server.list_pods()) == 1000
        server.wait_for_output("ended 1 watcher(s): watcher fell behind")
        # Now read: what was already in flight, then RESOURCE_EXHAUSTED.
        received = 0
        with pytest.raises(grpc.RpcError) as info:
            for _ in stalled:
                received += 1
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fell behind" in (info.value.details() or "")
        assert 0 < received < 3000
    finally:
        channel.close()
    # The node agent carries on, and a new watcher gets the whole current state.
    fresh = WatchStream(server)
    try:
        fresh.wait_for(K.EVENT_KIND_CURRENT_STATE_END)
        assert kinds(fresh.events).count("POD_ENROLLED") == 1000
    finally:
        fresh.close()


def test_a_watcher_that_reads_on_is_not_ended_by_a_burst_past_its_queue(
    start_server: StartServer, peers: Peers, tmp_path: object
) -> None:
    """A bulk enrollment makes events faster than the node agent sends them to a watcher that
    reads all the while: 400 pods ended every such watcher at the default queue (here 128 and
    200 pods, ~600 events). Only one whose client reads nothing for 2 s is ended."""
    server = start_server("--watch-queue", "128")
    peers.acking(server.zds_socket)
    stream = WatchStream(server)
    try:
        stream.wait_for(K.EVENT_KIND_CURRENT_STATE_END)
        enroll_from_file(server, tmp_path, 200)
        stream.wait_for(K.EVENT_KIND_POD_ENROLLED, count=200)
        assert stream.error is None and not stream.done.is_set()
        assert "fell behind" not in server.output()
    finally:
        stream.close()


def test_watchers_are_told_when_the_node_agent_shuts_down(
    server: NodeAgentProc, peers: Peers, streams: list[WatchStream]
) -> None:
    peers.acking(server.zds_socket)
    # (its snapshot's events, acked, complete, are all out by this line: none is live then)
    server.wait_for_output("snapshot sent to ztunnel")
    stream = WatchStream(server)
    streams.append(stream)
    stream.wait_for(K.EVENT_KIND_CURRENT_STATE_END)
    assert server.stop() == 0
    assert stream.done.wait(10)
    assert stream.error is not None and stream.error.code() is grpc.StatusCode.UNAVAILABLE
    assert stream.error.details() == "node agent shutting down"
    assert kinds(stream.live()) == ["ZTUNNEL_DISCONNECTED"]


# -- zds watch ----------------------------------------------------------------------------


def start_watch(server: NodeAgentProc, tmp_path: object, *args: str, name: str = "watch") -> tuple[Any, str]:
    out = os.path.join(str(tmp_path), f"{name}.out")
    proc = subprocess.Popen(
        [*ZDS, "watch", "--control-socket", server.control_socket, *args],
        stdout=open(out, "w"),  # noqa: SIM115 (the child owns it; closed when we drop it)
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, out


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def stop_process(proc: Any) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    if proc.stdout:
        proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()


def test_zds_watch_prints_one_readable_line_per_event_and_exits_cleanly_on_ctrl_c(
    server: NodeAgentProc, peers: Peers, tmp_path: object
) -> None:
    peers.acking(server.zds_socket, nack={"u2": "failure to start proxy : boom"})
    add(server, "u1", name="web", namespace="shop")
    proc, out = start_watch(server, tmp_path)
    try:
        wait_until(lambda: "live events follow" in read(out), what="the end of the current state")
        add(server, "u2", name="db", namespace="shop")
        server.remove_pod("u1")
        wait_until(lambda: read(out).count("message acked") >= 1, what="the del ack")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        stop_process(proc)
    lines = read(out).splitlines()
    assert lines[0].split()[1:3] == ["pod", "enrolled"] and "uid=u1 pod=shop/web" in lines[0]
    assert lines[0].endswith("(current state)")
    assert "ztunnel connected" in lines[1] and "version=V1 state=ready newest (current state)" in lines[1]
    assert "--- current state: 1 pod(s), 1 ztunnel connection(s); live events follow ---" in lines[2]
    live = [" ".join(line.split()[1:3]) for line in lines[3:]]
    assert live == [
        "pod enrolled",
        "message sent",
        "message nacked",
        "pod removed",
        "message sent",
        "message acked",
    ]
    assert "uid=u2 pod=shop/db latency=" in lines[5] and 'error="failure to start proxy : boom"' in lines[5]
    assert " del uid=u1 pod=shop/web latency=" in lines[8]


def test_zds_watch_json_and_kind_filter(server: NodeAgentProc, peers: Peers, tmp_path: object) -> None:
    peers.acking(server.zds_socket)
    proc, out = start_watch(server, tmp_path, "--json", "--kind", "pod-enrolled,POD_REMOVED")
    try:
        wait_until(lambda: "CURRENT_STATE_END" in read(out), what="the marker")
        add(server, "u1", name="web", namespace="shop")
        server.remove_pod("u1")
        wait_until(lambda: "POD_REMOVED" in read(out), what="the removal")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
    docs = [json.loads(line) for line in read(out).splitlines()]
    assert [d["kind"] for d in docs] == [
        "EVENT_KIND_CURRENT_STATE_END",
        "EVENT_KIND_POD_ENROLLED",
        "EVENT_KIND_POD_REMOVED",
    ]
    assert docs[1]["pod"]["name"] == "web" and docs[1]["uid"] == "u1" and "time" in docs[1]


def test_zds_watch_rejects_an_unknown_kind(server: NodeAgentProc) -> None:
    out = subprocess.run(
        [*ZDS, "watch", "--kind", "pod-exploded", "--control-socket", server.control_socket],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "unknown event kind 'pod-exploded'" in out.stderr


@pytest.mark.parametrize(("sig", "text"), [(signal.SIGKILL, "went away"), (signal.SIGTERM, "shutting down")])
def test_zds_watch_says_so_when_the_node_agent_goes_away(
    server: NodeAgentProc, tmp_path: object, sig: int, text: str
) -> None:
    proc, out = start_watch(server, tmp_path)
    try:
        wait_until(lambda: "live events follow" in read(out), what="the marker")
        server.stop(sig)
        assert proc.wait(15) == 1
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert err.startswith("zds watch: the node agent went away") and text in err
        assert "Traceback" not in err
    finally:
        stop_process(proc)


def test_zds_watch_without_a_node_agent_says_where_it_looked(tmp_path: object) -> None:
    sock = os.path.join(str(tmp_path), "nothing.sock")
    out = subprocess.run(
        [*ZDS, "watch", "--control-socket", sock], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1 and "cannot reach the node agent" in out.stderr and sock in out.stderr


def test_watchers_are_bounded_and_share_one_current_state(
    server: NodeAgentProc, streams: list[WatchStream]
) -> None:
    """Each watcher held a copy of every pod until sent, and nothing bounded them (1,441
    watchers that read nothing, 2,000 pods: 1.2 GB). At most WATCHERS_MAX watch at once, one
    more is told RESOURCE_EXHAUSTED in one line, and one that ends makes room."""
    from zds import defaults

    for _ in range(defaults.WATCHERS_MAX):
        streams.append(WatchStream(server))
    for stream in streams:
        stream.wait_for(nodeagent_pb2.EVENT_KIND_CURRENT_STATE_END)
    extra = WatchStream(server)
    streams.append(extra)
    assert extra.done.wait(15)
    assert extra.error is not None and extra.error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert extra.error.details() == (
        f"{defaults.WATCHERS_MAX} watchers are watching already; watch again once one ends"
    )
    assert extra.events == []  # told at once: not sent (and made to hold) the current state first
    streams[0].close()

    def watching_again() -> bool:  # once the node agent has seen the closed stream go
        again = WatchStream(server)
        streams.append(again)
        wait_until(lambda: again.done.is_set() or bool(again.events), "an answer")
        return again.error is None

    wait_until(watching_again, "a watcher let in again")


def test_the_current_states_counts_say_when_a_filter_chose_them() -> None:
    """With --kind or --uid, "current state: 0 pod(s)" read as if the node agent had none."""
    from zds.server.inspectctl import EventPrinter

    said = []
    for filtered in (False, True):
        out = io.StringIO()
        printer = EventPrinter(out, as_json=False, filtered=filtered)
        printer.print(
            nodeagent_pb2.Event(kind=nodeagent_pb2.EVENT_KIND_ZTUNNEL_CONNECTED, current_state=True)
        )
        printer.print(nodeagent_pb2.Event(kind=nodeagent_pb2.EVENT_KIND_CURRENT_STATE_END))
        said.append(out.getvalue().splitlines()[-1].split("  ", 1)[1])
    assert said == [
        "--- current state: 0 pod(s), 1 ztunnel connection(s); live events follow ---",
        "--- current state: 0 pod(s), 1 ztunnel connection(s) shown (--kind, --uid); live events follow ---",
    ]


def test_zds_watch_gives_up_on_a_socket_that_never_answers(tmp_path: object) -> None:
    """Something accepts on the control socket and says nothing: the watch waited silently for
    good (every other client gives up after --timeout)."""
    path = os.path.join(str(tmp_path), "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)  # (the kernel accepts into the backlog; nobody ever reads)
    try:
        done = subprocess.run(
            [*ZDS, "watch", "--control-socket", path, "--timeout", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        listener.close()
    assert (done.returncode, done.stderr) == (
        1,
        f"zds watch: no answer from the node agent at {path} within 1 s\n",
    )


async def test_watchers_that_fall_behind_together_are_said_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """65 watchers that stopped reading were 65 identical warnings in one millisecond."""
    from zds.server.eventkinds import EventKind
    from zds.server.events import EventBus

    caplog.set_level(logging.WARNING, logger="zds.server.watch")
    bus = EventBus(watch_queue=1, watch_stall=0.0)  # (none of them reads: ended at the first one over)
    bus.fell_behind.every = 0.2  # (10 s in a node agent)
    watchers = [bus.subscribe([]) for _ in range(65)]
    for _ in range(2):  # the first event fills each queue, the second ends each watch
        bus.publish(EventKind.POD_ENROLLED, uid="u1")
    assert all(w.end is not None for w in watchers)
    assert [r.getMessage() for r in caplog.records] == [
        "ended 1 watcher(s): watcher fell behind: 1 events were waiting to be sent (it took none for 0s); "
        "watch again to get the current state"
    ]
    await async_wait_until(lambda: len(caplog.records) == 2, "the rest said", timeout=15)
    assert caplog.records[1].getMessage().startswith("ended 64 watcher(s): watcher fell behind")


async def test_a_watcher_that_reads_on_but_too_slowly_is_told_so_not_blamed_on_its_queue() -> None:
    """Ended at the hard limit (the node agent making events faster than the stream is sent
    them, the writer taking them all along), the end said the limit's count and ``--watch-queue``
    as if the watcher had stopped reading: how many waited, and why, now."""
    from zds import defaults
    from zds.server.eventkinds import EventKind
    from zds.server.events import EventBus

    bus = EventBus(watch_queue=2, watch_stall=60.0)
    watcher = bus.subscribe([])
    assert (await watcher.next()).kind is EventKind.CURRENT_STATE_END  # (it took one just now)
    for _ in range(2 * defaults.WATCH_QUEUE_HARD + 1):
        bus.publish(EventKind.POD_ENROLLED, uid="u1")
    assert watcher.end is not None
    said = str(watcher.end)
    assert f"{2 * defaults.WATCH_QUEUE_HARD} events were waiting" in said
    assert f"{defaults.WATCH_QUEUE_HARD}x --watch-queue 2: the node agent made them faster" in said


async def test_a_watcher_whose_writer_waits_for_events_is_not_taken_for_stalled() -> None:
    """Its writer idle in ``next`` past the stall time, a burst over the queue in one step
    ended it at the first event over: idle is not stalled."""
    from zds.server.eventkinds import EventKind
    from zds.server.events import EventBus

    bus = EventBus(watch_queue=4, watch_stall=0.2)
    watcher = bus.subscribe([])
    assert (await watcher.next()).kind is EventKind.CURRENT_STATE_END
    waiting = asyncio.ensure_future(watcher.next())
    await asyncio.sleep(0.5)
    for _ in range(6):
        bus.publish(EventKind.POD_ENROLLED, uid="u1")
    assert watcher.end is None
    got = [await waiting] + [await watcher.next() for _ in range(5)]
    assert [event.kind for event in got] == [EventKind.POD_ENROLLED] * 6
    watcher.close()
