"""Faults on demand in the node agent (InjectFault, zds fault, --faults): what each kind puts on
the wire (seen by a raw ztunnel stand-in), how a fault that makes no sense is refused, and how
every fault is logged, counted and streamed. The kinds ``zds check node-agent`` catches are
proven by tests/test_check_node_agent.py; the others are proven here."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import subprocess
import threading
from typing import Any

import grpc
import pytest

from tests.harness import ZDS, NodeAgentProc, StartServer, faults_file, wait_until
from tests.standins import Peers, RawPeer, request_of
from zds.gen import nodeagent_pb2
from zds.protocol.messages import AddWorkload, SnapshotSent

pytestmark = pytest.mark.root


def inject(server: NodeAgentProc, kind: str, **fields: Any) -> Any:
    """InjectFault (the kind as zds fault names it)."""
    request = nodeagent_pb2.InjectFaultRequest(
        kind=getattr(nodeagent_pb2, "FAULT_KIND_" + kind.upper().replace("-", "_")), **fields
    )
    with server.control() as stub:
        return stub.InjectFault(request, timeout=60).fault


def connected(server: NodeAgentProc, peers: Peers) -> RawPeer:
    peer = peers.raw(server.zds_socket)
    peer.hello()
    for entry in peer.take_snapshot():
        entry.close_fds()
    wait_until(lambda: server.connected_count() == 1, "the connection")
    return peer


def add_pod(server: NodeAgentProc, uid: str, netns: str) -> threading.Thread:
    """AddPod waits for the ack: in a thread, beside the stand-in that answers."""

    def run() -> None:
        with contextlib.suppress(grpc.RpcError):  # the outcome is judged on the wire here
            server.add_pod(uid, netns)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_delay_writes_the_next_messages_late(server: NodeAgentProc, peers: Peers, make_pod: Any) -> None:
    peer = connected(server, peers)
    inject(server, "delay", count=1, delay={"seconds": 1})
    adding = add_pod(server, "u1", make_pod().path)
    got = peer.expect()
    # The fault says it took effect after its wait and before the write: the line is there
    # by the time the message is.
    assert re.search(r"fault f1 \(delay\) took effect: \w+ on conn \S+ written 1s late", server.output())
    assert isinstance(request_of(got), AddWorkload)
    got.close_fds()
    peer.ack()
    adding.join()


def test_drop_before_closes_instead_of_writing(server: NodeAgentProc, peers: Peers, make_pod: Any) -> None:
    peer = connected(server, peers)
    inject(server, "drop-before")
    adding = add_pod(server, "u1", make_pod().path)
    peer.expect_closed()
    adding.join()
    [pod] = server.list_pods()
    assert "fault f1 drop-before" in pod.last_error  # the pod stays cached, as after any lost connection


def test_drop_after_closes_right_after_writing(server: NodeAgentProc, peers: Peers, make_pod: Any) -> None:
    peer = connected(server, peers)
    inject(server, "drop-after")
    adding = add_pod(server, "u1", make_pod().path)
    got = peer.expect()
    assert isinstance(request_of(got), AddWorkload) and len(got.fds) == 1
    got.close_fds()
    peer.expect_closed()
    adding.join()


def test_no_payload_is_just_an_unknown_field(server: NodeAgentProc, peers: Peers) -> None:
    peer = connected(server, peers)
    inject(server, "no-payload")
    assert peer.expect().payload == bytes.fromhex("7801")
    peer.ack("failure to read message : no payload")


def test_add_with_two_fds_and_duplicate_add_use_the_pods_own_netns(
    server: NodeAgentProc, peers: Peers, make_pod: Any
) -> None:
    peer = connected(server, peers)
    adding = add_pod(server, "u1", make_pod().path)
    first = peer.expect()
    peer.ack()
    adding.join()
    inject(server, "add-with-two-fds", uid="u1")
    two = peer.expect()
    assert two.payload == first.payload and len(two.fds) == 2
    peer.ack("failure to read message : Expected 1 FD, got 2")
    inject(server, "duplicate-add")
    again = peer.expect()
    assert again.payload == first.payload and len(again.fds) == 1
    peer.ack()
    for record in (first, two, again):
        record.close_fds()


def test_an_add_a_fault_made_up_with_a_pods_uid_leaves_the_pods_state_alone(
    server: NodeAgentProc, peers: Peers, make_pod: Any
) -> None:
    """ztunnel refuses these records (ztunnel itself then stops); the pod's own AddWorkload
    was acked all the same: it stays acked, not failed with the fault's error."""
    peer = connected(server, peers)
    adding = add_pod(server, "u1", make_pod().path)
    peer.expect().close_fds()
    peer.ack()
    adding.join()
    inject(server, "add-without-workload-info", uid="u1")
    peer.expect().close_fds()
    peer.ack("workload_info is required but not present")
    inject(server, "add-with-two-fds", uid="u1")
    peer.expect().close_fds()
    peer.ack("failure to read message : Expected 1 FD, got 2")
    adding = add_pod(server, "u2", make_pod().path)  # (its write has the answers before it reported)
    peer.expect().close_fds()
    peer.ack()
    adding.join()
    states = {pod.uid: (pod.state, pod.last_error) for pod in server.list_pods()}
    assert states == {"u1": (nodeagent_pb2.POD_STATE_ACKED, ""), "u2": (nodeagent_pb2.POD_STATE_ACKED, "")}
    assert "ztunnel nacked add: failure to read message : Expected 1 FD, got 2" in server.output()


def test_armed_faults_are_listed_and_cleared_one_or_all(
    server: NodeAgentProc, peers: Peers, make_pod: Any
) -> None:
    """A fault armed for good (a count of 2**31-1, a delay of an hour, a connection that never
    comes) took a restart to be rid of. A cleared one is dropped: a delay it was waiting out
    ends at once, and an InjectFault waiting for it answers."""
    peer = connected(server, peers)
    assert server.cli("fault", "delay", "--delay", "3600", "--count", "2147483647").returncode == 0
    assert server.cli("fault", "leak-netns-fds", "--count", "2147483647").returncode == 0
    waiting = subprocess.Popen(
        [
            *ZDS,
            "fault",
            "keep-unknown-uid",
            "--next-connection",
            "--wait",
            "--control-socket",
            server.control_socket,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: "f3 armed" in server.output(), "the third fault armed")
        listed = server.cli("faults", "list")
        assert listed.returncode == 0, listed.stderr
        assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
            ["ID", "KIND"],
            ["f1", "delay"],
            ["f2", "leak-netns-fds"],
            ["f3", "keep-unknown-uid"],
        ]
        adding = add_pod(server, "u1", make_pod().path)  # waits out f1's hour...
        wait_until(lambda: "sent add" in server.output() or server.list_pods(), "the pod in the cache")
        cleared = server.cli("faults", "clear", "f1")
        assert cleared.stdout == "fault f1 cleared (delay on conn " + cleared.stdout.split("conn ")[1]
        peer.expect().close_fds()  # ... no longer
        peer.ack()
        adding.join()
        assert server.cli("faults", "clear").stdout.splitlines() == [
            "fault f2 cleared (leak-netns-fds on the node agent)",
            "fault f3 cleared (keep-unknown-uid on the next connection)",
        ]
        assert waiting.wait(30) == 1 and "f3 dropped" in waiting.communicate()[0]
        assert server.cli("faults", "list").stdout.splitlines() == ["ID  KIND  TARGET  COUNT  UID  DETAIL"]
        assert server.cli("faults", "clear").stdout == "no fault was armed\n"
        gone = server.cli("faults", "clear", "f1")
        assert gone.returncode == 1
        assert gone.stderr == "zds faults clear: NOT_FOUND: no armed fault f1 (zds faults list shows them)\n"
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert "fault f1 (delay) dropped: cleared (zds faults clear)" in server.output()


def test_omit_from_snapshot_leaves_the_pod_out_of_the_next_snapshot(
    server: NodeAgentProc, peers: Peers, make_pod: Any
) -> None:
    add_pod(server, "u1", make_pod().path).join()  # no ztunnel yet: cached
    add_pod(server, "u2", make_pod().path).join()
    inject(server, "omit-from-snapshot", uid="u1", next_connection=True)
    peer = peers.raw(server.zds_socket)
    peer.hello()
    entries = peer.take_snapshot()
    assert [request_of(e).uid for e in entries] == ["u2"]  # type: ignore[union-attr]
    for entry in entries:
        entry.close_fds()


def test_a_fault_that_makes_no_sense_now_is_refused_in_one_line(server: NodeAgentProc, peers: Peers) -> None:
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        (
            {"kind": "oversize-record"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "no ztunnel connection; arm it for",
        ),
        (
            {"kind": "duplicate-add", "next_connection": True},
            grpc.StatusCode.FAILED_PRECONDITION,
            "no pod is enrolled",
        ),
        (
            {"kind": "omit-from-snapshot", "next_connection": True},
            grpc.StatusCode.INVALID_ARGUMENT,
            "give --uid",
        ),
        ({"kind": "delay"}, grpc.StatusCode.INVALID_ARGUMENT, "give --delay SECONDS"),
        ({"kind": "add-to-oldest", "next_connection": True}, grpc.StatusCode.INVALID_ARGUMENT, "delivery"),
        (
            {"kind": "drop-after", "connection_id": "nope"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "no ztunnel connection nope",
        ),
        (  # (the id was kept, never used, whatever its size: 256 faults of 4 MB ids)
            {"kind": "drop-after", "connection_id": "c" * 100_000, "next_connection": True},
            grpc.StatusCode.INVALID_ARGUMENT,
            "drop-after: --connection or --next-connection, not both",
        ),
    ]
    for fields, code, says in cases:
        kind = str(fields.pop("kind"))
        with pytest.raises(grpc.RpcError) as refused:
            inject(server, kind, **fields)
        assert refused.value.code() == code, (kind, refused.value.details())
        assert says in refused.value.details() and "\n" not in refused.value.details()
    connected(server, peers)
    server.wait_for_output("snapshot sent to ztunnel")  # (its ack read: the snapshot is complete)
    with pytest.raises(grpc.RpcError) as late:
        inject(server, "withhold-snapshot-sent")
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has sent its snapshot already; use --next-connection" in late.value.details()
    with pytest.raises(grpc.RpcError) as hello:
        inject(server, "record-before-hello")
    assert "said hello already" in hello.value.details()


def test_an_unset_kind_is_required_and_an_unknown_one_is_named(server: NodeAgentProc) -> None:
    """A kind no zds.v1.FaultKind has (999) was told "kind is required", as if none was given:
    each is refused INVALID_ARGUMENT in one line, saying which it was."""
    from zds.server.faultkinds import FaultKind

    with server.control() as stub:
        for kind, says in (
            (nodeagent_pb2.FAULT_KIND_UNSPECIFIED, "kind is required: one of delay, drop-before, "),
            (999, "unknown fault kind 999 (known: 1 (delay), 2 (drop-before), "),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.InjectFault(nodeagent_pb2.InjectFaultRequest(kind=kind), timeout=60)  # type: ignore[arg-type]
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            details = refused.value.details()
            assert details.startswith(says) and "\n" not in details, details
    assert all(f"({known.label})" in details for known in FaultKind), details  # every kind named


def test_faults_are_logged_counted_and_streamed_in_watch(
    start_server: StartServer, peers: Peers, tmp_path: pathlib.Path
) -> None:
    server = start_server("--http-listen", "127.0.0.1:0")
    watch = subprocess.Popen(
        [*ZDS, "watch", "--kind", "fault-injected,fault-applied", "--control-socket", server.control_socket],
        stdout=subprocess.PIPE,
        text=True,
    )
    fault: subprocess.Popen[str] | None = None
    try:
        assert watch.stdout is not None
        assert "live events follow" in watch.stdout.readline()  # subscribed: nothing is missed from here
        peer = connected(server, peers)
        fault = subprocess.Popen(
            [*ZDS, "fault", "unknown-field", "--wait", "--control-socket", server.control_socket],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        got = peer.expect()  # --wait answers once ztunnel has
        assert got.payload.endswith(bytes.fromhex("7801"))
        peer.ack()
        out, err = fault.communicate(timeout=60)
        assert fault.returncode == 0, err
        assert out.startswith("fault f1 applied (unknown-field on conn ")
        assert "ztunnel acked it" in out
        refused = subprocess.run(
            [*ZDS, "fault", "withhold-snapshot-sent", "--control-socket", server.control_socket],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1
        assert refused.stderr.startswith("zds fault: FAILED_PRECONDITION: withhold-snapshot-sent: conn ")
        lines: list[str] = []
        while len(lines) < 2:
            line = watch.stdout.readline()
            assert line, f"zds watch ended ({watch.wait(15)}) after {lines}"
            if "fault" in line:
                lines.append(line)
        assert "fault injected" in lines[0] and "f1 unknown-field" in lines[0] and "state=armed" in lines[0]
        assert "fault applied" in lines[1] and "ztunnel acked it" in lines[1]
    finally:
        for proc in (watch, fault):
            if proc is not None:
                proc.terminate()
                proc.wait(15)
    assert "fault f1 armed: unknown-field" in server.output()


def test_a_faults_file_is_armed_at_start_and_a_bad_one_stops_the_start(
    start_server: StartServer, peers: Peers, tmp_path: pathlib.Path
) -> None:
    bad = faults_file(tmp_path / "bad.jsonl", {"kind": "no-such-fault"})
    failing = start_server("--faults", bad, ready=False)
    assert failing.wait_exit() == 1
    assert f"--faults {bad}: {bad}:1: unknown fault 'no-such-fault'" in failing.output()
    good = faults_file(tmp_path / "good.jsonl", {"kind": "withhold-snapshot-sent"})
    server = start_server("--faults", good, name="good")
    peer = peers.raw(server.zds_socket)
    peer.hello()
    server.wait_for_output("fault f1 (withhold-snapshot-sent) took effect")
    assert peer.recv(timeout=1.0) is None  # no snapshot entries, and never the SnapshotSent


def test_zds_fault_lists_every_kind_in_its_help() -> None:
    from zds.server.faultkinds import FaultKind

    done = subprocess.run([*ZDS, "fault", "--help"], capture_output=True, text=True, timeout=60)
    for kind in FaultKind:
        assert kind.label in done.stdout


def test_second_snapshot_sent_for_the_next_connection_comes_after_its_snapshot(
    server: NodeAgentProc, peers: Peers
) -> None:
    inject(server, "second-snapshot-sent", next_connection=True)
    peer = peers.raw(server.zds_socket)
    peer.hello()
    assert peer.take_snapshot() == []
    again = peer.expect()
    assert isinstance(request_of(again), SnapshotSent)
    peer.ack('failure to process message : ProtocolError("pod snapshot received already")')


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("faults.jsonl", b'{"kind": ' + b"1" * 5000 + b"}\n", ":1: JSON that cannot be read"),
        ("faults.yaml", b"- " + b"[" * 5000 + b"]" * 5000 + b"\n", ": YAML that cannot be read"),
        ("faults.yaml", b"\xff\xfe\x00bad\n", ": not UTF-8 text"),
        ("faults.yaml", b"- kind: [nack-adds\n", ": neither JSON lines nor valid YAML: "),
        ("faults.yaml", b"kind: nack-adds\n", ": expected a list of faults (or faults: holding one)"),
        ("faults.yaml", b"- {kind: delay}\n" * 100_000, ": over 1024 KiB; a fault file is a few lines"),
        ("faults.yaml", b"- {kind: delay}\n" * 257, ": 257 faults, more than the 256 that can be armed"),
    ],
)
def test_a_faults_file_that_cannot_be_read_is_refused_in_one_line(
    tmp_path: pathlib.Path, name: str, data: bytes, says: str
) -> None:
    """Nested too deep, an integer of more digits than Python converts, not UTF-8 (a
    traceback), one mapping (the ztunnel side armed nothing), too large (read whole, then
    refused at entry 257): a refusal in one line naming the file, before anything is armed,
    on both ends (the node agent's --faults, zds ztunnel's --faults)."""
    from zds.client.faults import ZtunnelFaultError, ZtunnelFaults, load_faults
    from zds.server.faultkinds import FaultError
    from zds.server.faultsfile import load_faults_file

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(FaultError) as refused:
        load_faults_file(str(path))
    assert str(refused.value).startswith(f"{path}{says}") and "\n" not in str(refused.value), refused.value
    faults = ZtunnelFaults()
    with pytest.raises(ZtunnelFaultError) as also:
        load_faults(str(path), faults)
    assert str(also.value) == str(refused.value) and faults.faults == []


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"kind": "delay"}, "delay: give delay SECONDS (more than 0)"),
        ({"kind": "drop-before", "count": 0}, "drop-before: count must be at least 1"),
        ({"kind": "drop-before", "delay": 2}, "drop-before takes no delay"),
        (
            {"kind": "record-before-hello", "count": 2},
            "record-before-hello acts once on its connection: count must be 1",
        ),
        (
            {"kind": "add-to-oldest", "skip_connections": 2},
            "add-to-oldest acts on the node agent's delivery, not on one",
        ),
        ({"kind": "add-to-oldest", "after_snapshot": True}, "add-to-oldest takes no after_snapshot"),
        (
            {"kind": "withhold-snapshot-sent", "after_snapshot": True},
            "withhold-snapshot-sent takes no after_snapshot",
        ),
        ({"kind": "omit-from-snapshot", "uid": 0}, "uid must be a string"),
        ({"kind": "unknown-field", "uid": "u1"}, "unknown-field takes no uid"),
    ],
)
def test_a_faults_file_entry_that_makes_no_sense_is_refused_before_the_start(
    tmp_path: pathlib.Path, entry: dict[str, Any], says: str
) -> None:
    """Refused while the file is read (before the state directory is claimed, the store
    opened, pods recovered), naming the entry and its keys, not zds fault's flags; an option
    a kind does not use was taken and ignored."""
    from zds.server.faultkinds import FaultError
    from zds.server.faultsfile import load_faults_file

    path = faults_file(tmp_path / "faults.jsonl", {"kind": "delay", "delay": 1}, entry)
    with pytest.raises(FaultError) as refused:
        load_faults_file(path)
    assert str(refused.value).startswith(f"{path}:2: {says}"), refused.value


def test_a_delay_no_timer_can_take_is_refused_and_a_watch_stream_lives_on(server: NodeAgentProc) -> None:
    """A Duration of 2**63-1 seconds (or any delay past FAULT_DELAY_MAX): INVALID_ARGUMENT in
    one line; nothing armed, no traceback, and a Watch stream open meanwhile goes on."""
    from google.protobuf.duration_pb2 import Duration

    from tests.harness import WatchStream

    watch = WatchStream(server)
    try:
        watch.wait_for(nodeagent_pb2.EVENT_KIND_CURRENT_STATE_END)
        for seconds in (2**63 - 1, 3601):
            with pytest.raises(grpc.RpcError) as refused:
                inject(server, "delay", next_connection=True, delay=Duration(seconds=seconds))
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == "delay: --delay must be 0 to 3600 seconds"
        armed = inject(server, "delay", next_connection=True, delay=Duration(seconds=2))
        assert armed.delay.seconds == 2
        [injected] = watch.wait_for(nodeagent_pb2.EVENT_KIND_FAULT_INJECTED)  # only the good one
        assert injected.fault.delay.seconds == 2
        assert watch.error is None and not watch.done.is_set()
    finally:
        watch.close()
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("delay", ["1e300", "NaN", "-1"])
def test_a_faults_file_delay_out_of_range_is_refused_on_both_ends(
    start_server: StartServer, tmp_path: pathlib.Path, delay: str
) -> None:
    from zds.client.faults import ZtunnelFaultError, ZtunnelFaults, load_faults

    node_agent = tmp_path / "node-agent.jsonl"
    node_agent.write_text(f'{{"kind": "drop-before", "delay": {delay}}}\n')
    failing = start_server("--faults", str(node_agent), ready=False)
    assert failing.wait_exit() == 1
    assert f"{node_agent}:1: drop-before: delay must be 0 to 3600 seconds" in failing.output()
    assert "Traceback" not in failing.output()
    ztunnel = tmp_path / "ztunnel.jsonl"
    ztunnel.write_text(f'{{"kind": "delay-acks", "delay": {delay}}}\n')
    with pytest.raises(ZtunnelFaultError, match="delay"):
        load_faults(str(ztunnel), ZtunnelFaults())


def test_armed_faults_are_bounded_and_a_uid_only_where_a_kind_uses_one(server: NodeAgentProc) -> None:
    """Every InjectFault was kept for good (20,000 with a 100 KB uid each: 2 GB): at most
    FAULTS_ARMED_MAX are armed at once, one past it is refused in one line, and a kind that
    uses no pod refuses a uid instead of keeping it."""
    from google.protobuf.duration_pb2 import Duration

    from zds import defaults

    with pytest.raises(grpc.RpcError) as refused:
        inject(server, "add-to-oldest", uid="u" * 100_000)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "add-to-oldest takes no --uid"
    for _ in range(defaults.FAULTS_ARMED_MAX):
        inject(server, "delay", next_connection=True, delay=Duration(seconds=1))
    with pytest.raises(grpc.RpcError) as refused:
        inject(server, "add-to-oldest")
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == (
        f"add-to-oldest: {defaults.FAULTS_ARMED_MAX} faults are armed already; let some take effect first"
    )
    assert "Traceback" not in server.output()


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"kind": "delay", "delay": 1, "count": 1e400}, "count must be a whole number from 0 to 2147483647"),
        ({"kind": "delay", "delay": 1, "count": 1.7}, "count must be a whole number"),
        ({"kind": "delay", "delay": 1, "count": True}, "count must be a whole number"),
        ({"kind": "delay", "delay": 1, "skip_connections": -1}, "skip_connections must be a whole number"),
        ({"kind": "delay", "delay": "1"}, "delay must be a number of seconds"),
        (
            {"kind": "omit-from-snapshot", "uid": "u", "after_snapshot": "false"},
            "after_snapshot must be true or false",
        ),
    ],
)
def test_a_faults_file_entry_is_taken_as_written_or_refused(entry: dict[str, object], says: str) -> None:
    """ "false" was true, 1.7 was 1 and true was 1; a count of 1e400 was an OverflowError traceback."""
    from zds.server.faultkinds import FaultError
    from zds.server.faultsfile import spec_from_entry

    with pytest.raises(FaultError, match=f"^entry 1: {says}"):
        spec_from_entry(entry, "entry 1")


def test_a_faults_file_that_is_a_fifo_nobody_writes_to_is_refused_at_once(tmp_path: pathlib.Path) -> None:
    """Opening it waited for a writer for good, on both ends (a start that never came)."""
    from zds.client.faults import ZtunnelFaultError, ZtunnelFaults, load_faults
    from zds.server.faultkinds import FaultError
    from zds.server.faultsfile import load_faults_file

    fifo = tmp_path / "faults.fifo"
    os.mkfifo(fifo)
    with pytest.raises(FaultError) as refused:
        load_faults_file(str(fifo))
    assert (
        str(refused.value)
        == f"cannot read fault file {fifo}: a FIFO that gave nothing (is its writer started?)"
    )
    with pytest.raises(ZtunnelFaultError):
        load_faults(str(fifo), ZtunnelFaults())
