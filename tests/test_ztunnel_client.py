"""``zds ztunnel`` against a fake node agent: real sockets, real namespaces.

The fake node agent (``tests.harness.FakeNodeAgent``) is a raw ``SOCK_SEQPACKET``
listener driven from the test, so it can send what a well-behaved agent never
would (bad records, protocol errors). ``zds ztunnel`` runs as a real process (its
fd table, its exit code, its listeners in the pods), except where a test plugs in
a connection handler and runs it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from tests.harness import (
    PORTS,
    WAYS_OF_WAITING,
    Pod,
    ZtunnelProc,
    check_half_requests_bounded,
    check_places_not_held,
    faults_file,
    fd_count,
    file_fd_count,
    http_get,
    listening,
    pod_ports,
    settled_fd_count,
    taken_port,
    wait_until,
)
from tests.standins import FakeConnection, FakeNodeAgent
from zds.check.inpod import socket_inodes
from zds.client.admin import metrics_coding
from zds.client.app import Ztunnel
from zds.client.backoff import Backoff
from zds.client.config import ZtunnelConfig, ZtunnelParts
from zds.client.listeners import AcceptedConnection, ListenerError, ListenerSpec, open_listeners
from zds.client.metrics import OPENMETRICS, PLAIN_TEXT, ZtunnelMetrics, content_type
from zds.client.session import Handover
from zds.client.workloads import ProxySettings
from zds.netns import in_netns, open_netns
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    encode_request,
)


@pytest.fixture
def agent(tmp_path: Any) -> Iterator[FakeNodeAgent]:
    a = FakeNodeAgent(str(tmp_path / "ztunnel.sock"))
    yield a
    a.close()


@pytest.fixture
def start_ztunnel(agent: FakeNodeAgent, tmp_path: Any) -> Iterator[Callable[..., ZtunnelProc]]:
    started: list[ZtunnelProc] = []

    def start(*extra: str) -> ZtunnelProc:
        z = ZtunnelProc(agent.path, str(tmp_path / f"ztunnel-{len(started)}.log"), *extra)
        started.append(z)
        return z

    yield start
    for z in started:
        z.stop(signal.SIGKILL)


# =============================================================================================
# Listeners in the pod
# =============================================================================================


@pytest.mark.root
def test_listeners_are_opened_inside_the_pod_netns_with_mark_1337_and_not_on_the_host(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert not pod_ports(pod, z.pid), "nothing listens before the Add"
    assert conn.add("uid-a", pod.path) == Ack()
    assert conn.snapshot() == Ack()
    ports = wait_until(lambda: pod_ports(pod, z.pid), "listeners in the pod")
    assert sorted(ports) == list(PORTS)
    assert {lst.mark for lst in ports.values()} == {1337}
    mine = socket_inodes(z.pid)
    host = [lst for lst in listening(None) if lst.inode in mine]
    assert not {lst.port for lst in host} & set(PORTS), f"ztunnel listens on the host: {host}"
    dump = z.config_dump()["workloadState"]["uid-a"]
    assert [entry["address"] for entry in dump["listeners"]] == [
        "[::]:15001",
        "[::]:15006",
        "[::]:15008",
        "127.0.0.1:15053",
        "[::1]:15053",
    ]


@pytest.mark.root
def test_a_deleted_pod_loses_its_listeners_and_others_keep_theirs(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    a, b = make_pod(), make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    conn.snapshot()
    assert conn.add("uid-a", a.path) == Ack()
    assert conn.add("uid-b", b.path) == Ack()
    before_b = wait_until(lambda: pod_ports(b, z.pid), "b's listeners")
    assert conn.delete("uid-a") == Ack()
    wait_until(lambda: not pod_ports(a, z.pid), "a's listeners closed")
    assert pod_ports(b, z.pid) == before_b
    assert z.workload_states() == {"uid-b": "Up"}
    assert conn.delete("uid-unknown") == Ack(), "Del of an unknown uid is a no-op ack"


@pytest.mark.root
def test_custom_ports_are_used_in_the_pod(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    z = start_ztunnel(
        "--outbound-port", "25001", "--inbound-port", "25006", "--hbone-port", "25008", "--dns-port", "25053"
    )
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    assert sorted(wait_until(lambda: pod_ports(pod, z.pid), "listeners")) == [25001, 25006, 25008, 25053]


@pytest.mark.root
def test_re_add_same_netns_is_a_no_op_and_another_netns_moves_the_listeners(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    old, new = make_pod(), make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    conn.snapshot()
    assert conn.add("uid-a", old.path) == Ack()
    first = wait_until(lambda: pod_ports(old, z.pid), "listeners in the first netns")
    assert conn.add("uid-a", old.path) == Ack()
    assert pod_ports(old, z.pid) == first, "same netns: the very same listening sockets"
    assert z.metrics()["workload_manager_proxies_started_total"] == 1
    assert conn.add("uid-a", new.path) == Ack()
    wait_until(lambda: sorted(pod_ports(new, z.pid)) == list(PORTS), "listeners in the new netns")
    wait_until(lambda: not pod_ports(old, z.pid), "listeners gone from the old netns")
    metrics = z.metrics()
    assert metrics["workload_manager_proxies_started_total"] == 2
    assert metrics["workload_manager_proxies_stopped_total"] == 1
    assert metrics["workload_manager_active_proxy_count"] == 1


# =============================================================================================
# Proxy start failures: nack, keep the connection, pending, retry
# =============================================================================================


def squat(pod: Pod, port: int = 15006) -> socket.socket:
    """A listener of the test's on ``port`` in ``pod``'s netns: the port taken for ztunnel."""
    with open_netns(pod.path) as handle, in_netns(handle):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("0.0.0.0", port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.mark.root
def test_a_port_taken_in_the_pod_is_nacked_pending_and_retried_until_it_works(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    squatter = squat(pod)
    try:
        z = start_ztunnel("--retry-interval", "0.3")
        conn = agent.connect_and_hello()
        nack = conn.add("uid-a", pod.path)
        assert nack.error.startswith("failure to start proxy : Bind([::]:15006, "), nack.error
        assert "Address already in use" in nack.error
        # The connection stays: the snapshot goes on.
        assert conn.snapshot() == Ack()
        assert not pod_ports(pod, z.pid), "all or none: no listener of a failed proxy stays open"
        w = z.config_dump()["workloadState"]["uid-a"]
        assert w["state"] == "Pending"
        assert w["lastError"].startswith("Bind([::]:15006")
        assert z.ready_status() == 500
        assert z.get("readiness", "/healthz/ready")[1] == "not ready, pending: workload proxy manager\n"
        metrics = z.metrics()
        assert metrics["workload_manager_pending_proxy_count"] == 1
        assert metrics["workload_manager_active_proxy_count"] == 0
        assert metrics['zds_ztunnel_nacks_total{reason="start"}'] == 1
        # Still failing on retries.
        wait_until(lambda: z.config_dump()["workloadState"]["uid-a"]["startFailures"] >= 2, "a failed retry")
    finally:
        squatter.close()
    wait_until(lambda: z.workload_states() == {"uid-a": "Up"}, "the retry to succeed")
    assert sorted(pod_ports(pod, z.pid)) == list(PORTS)
    wait_until(lambda: z.ready_status() == 200, "readiness")
    assert z.metrics()["workload_manager_pending_proxy_count"] == 0
    assert conn.delete("uid-a") == Ack(), "the connection is still served"


@pytest.mark.root
def test_with_several_ports_taken_the_nack_names_the_dns_port_as_ztunnels(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    """ztunnel's proxy factory binds the DNS proxy before the workload's listeners."""
    pod = make_pod()
    with open_netns(pod.path) as handle, in_netns(handle):
        squatters = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for squatter, address in zip(squatters, [("0.0.0.0", 15006), ("127.0.0.1", 15053)], strict=True):
            squatter.bind(address)
            squatter.listen()
        start_ztunnel()
        nack = agent.connect_and_hello().add("uid-a", pod.path)
        assert nack.error.startswith("failure to start proxy : ") and "15053" in nack.error, nack.error
        assert "15006" not in nack.error, nack.error
    finally:
        for squatter in squatters:
            squatter.close()


@pytest.mark.root
def test_a_pending_workload_deleted_is_forgotten_and_readiness_returns(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert conn.snapshot() == Ack()
    wait_until(lambda: z.ready_status() == 200, "ready with an empty snapshot")
    baseline = file_fd_count(z.pid)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        nack = conn.request(AddWorkload(uid="not-a-netns", info=WorkloadInfo("n", "ns", "sa")), [fd])
    finally:
        os.close(fd)
    assert nack.error == "failure to start proxy : the netns fd of not-a-netns is not a network namespace"
    assert z.workload_states() == {"not-a-netns": "Pending"}
    assert z.ready_status() == 500
    assert file_fd_count(z.pid) == baseline + 1, "a pending workload keeps its fd for the retry"
    assert conn.delete("not-a-netns") == Ack()
    assert z.workload_states() == {}
    assert z.ready_status() == 200
    assert file_fd_count(z.pid) == baseline


@pytest.mark.root
def test_the_retry_timer_runs_to_its_end_when_a_del_takes_the_pending_workload(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    """ztunnel's ``schedule_retry`` arms its timer only when none is armed, and a Del that
    leaves nothing pending does not disarm it: a workload that goes pending before it ends is
    retried then, not a whole interval after its own nack."""
    interval = 3.0
    first, second = make_pod(), make_pod()
    squatters = [squat(first)]
    try:
        squatters.append(squat(second))
        z = start_ztunnel("--no-dns", "--retry-interval", str(interval))
        conn = agent.connect_and_hello()
        assert conn.snapshot() == Ack()
        armed = time.monotonic()
        assert conn.add("uid-a", first.path).error.startswith("failure to start proxy : ")
        assert conn.delete("uid-a") == Ack()
        time.sleep(interval / 2)
        nacked = time.monotonic()
        assert conn.add("uid-b", second.path).error.startswith("failure to start proxy : ")
        squatters.pop().close()  # the second pod's port is free before the first timer ends
        wait_until(lambda: z.workload_states() == {"uid-b": "Up"}, "the retry", timeout=3 * interval)
        up = time.monotonic()
    finally:
        for squatter in squatters:
            squatter.close()
    # (a machine slow by half an interval could only make it later: never a false pass)
    assert up - nacked < interval, (
        f"retried {up - nacked:.1f} s after its nack, {up - armed:.1f} s after the timer began"
    )
    assert z.output().count("scheduling retry of pending workloads") == 1, z.output()


@pytest.mark.root
def test_a_nack_in_the_first_snapshot_is_retried_an_interval_after_the_nack(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    """The first snapshot is answered before the event loop runs; the retry timer of its nacks
    still runs from the nack (ztunnel's ``schedule_retry``), not from when the loop took over
    (at SnapshotSent, up to ``HTTP_START_DELAY`` later)."""
    interval, before_snapshot = 3.0, 0.8
    pod = make_pod()
    squatter = squat(pod)
    try:
        z = start_ztunnel("--no-dns", "--retry-interval", str(interval))
        conn = agent.connect_and_hello()
        assert conn.add("uid-a", pod.path).error.startswith("failure to start proxy : ")
        nacked = time.monotonic()
        time.sleep(before_snapshot)
        assert conn.snapshot() == Ack()
        squatter.close()
        wait_until(lambda: z.workload_states() == {"uid-a": "Up"}, "the retry", timeout=3 * interval)
        up = time.monotonic()
    finally:
        squatter.close()
    # (from the handover it came at ~interval + before_snapshot)
    assert interval - 0.2 < up - nacked < interval + before_snapshot / 2, (
        f"retried {up - nacked:.2f} s after the nack"
    )


# =============================================================================================
# Bad records: nack text, follow-up, no fd leaked
# =============================================================================================

INFO = WorkloadInfo(name="web", namespace="default", service_account="default")
ADD = encode_request(AddWorkload(uid="bad", info=INFO))
KEEP = encode_request(KeepWorkload(uid="bad"))
DEL = encode_request(DelWorkload(uid="bad"))
SNAP = encode_request(SnapshotSent())

# name → (payload, number of fds, expected nack or None for "no reply, read as EOF")
READ_ERRORS: dict[str, tuple[bytes, int, str | None]] = {
    "oversized record (truncated)": (b"\x0a\x82\x08" + b"x" * 1100, 0, "received truncated message"),
    "undecodable protobuf": (b"\xff\xff\xff", 0, "failed to decode Protobuf message: "),
    "request with no payload": (b"\x20\x01", 0, "no payload"),
    "add without an fd": (ADD, 0, "No control message"),
    "add with two fds": (ADD, 2, "Expected 1 FD, got 2"),
    # ztunnel's room for fds (cmsg_space!(RawFd)) takes two: the rest are cut (MSG_CTRUNC), and
    # its nix (0.31) refuses a cut control buffer: RecvMsg::cmsgs() is Err(ENOBUFS).
    "add with three fds": (ADD, 3, "ENOBUFS: No buffer space available"),
    "add with seven fds": (ADD, 7, "ENOBUFS: No buffer space available"),
    "keep with an fd": (KEEP, 1, "Unexpected control message"),
    "del with an fd": (DEL, 1, "Unexpected control message"),
    "snapshot_sent with an fd": (SNAP, 1, "Unexpected control message"),
    "undecodable with an fd": (b"\xff\xff", 1, "failed to decode Protobuf message: "),
    # prost refuses a known field of another wire type; upb would keep it aside, unknown
    "add whose uid is a varint": (bytes.fromhex("0a0408051200"), 1, "failed to decode Protobuf message: "),
    "zero-byte record": (b"", 0, None),
    "zero-byte record with an fd": (b"", 1, None),
}


@pytest.mark.root
def test_every_bad_record_is_nacked_then_ztunnel_reconnects_and_leaks_no_fd(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    z = start_ztunnel()

    def enroll() -> FakeConnection:
        conn = agent.connect_and_hello()
        assert conn.add("uid-a", pod.path) == Ack()
        assert conn.snapshot() == Ack()
        return conn

    conn = enroll()
    listeners = wait_until(lambda: pod_ports(pod, z.pid), "listeners")
    wait_until(lambda: z.ready_status() == 200, "ready")
    baseline = settled_fd_count(z.pid)
    files = file_fd_count(z.pid)
    for kind, (payload, nfds, expected) in READ_ERRORS.items():
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
        try:
            conn.send(payload, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if expected is not None:
            reply = conn.recv()
            assert reply, f"{kind}: no nack"
            error = decode_ack(reply).error
            assert error.startswith("failure to read message : " + expected), f"{kind}: {error}"
        conn.expect_closed()  # ztunnel closes after a read error (and after EOF)
        conn.close()
        conn = enroll()  # ... and reconnects; the new snapshot keeps the pod
        assert pod_ports(pod, z.pid) == listeners, f"{kind}: the pod's listeners were disturbed"
        assert file_fd_count(z.pid) == files, f"{kind}: a received fd leaked"
        wait_until(lambda: fd_count(z.pid) == baseline, f"fd count back to {baseline} after {kind}")
    assert z.proc.poll() is None
    assert z.metrics()["workload_manager_proxies_started_total"] == 1
    assert z.metrics()['zds_ztunnel_nacks_total{reason="read"}'] == 12


FATAL: dict[str, tuple[list[bytes], bytes, str]] = {
    "add without workload_info": (
        [],
        encode_request(AddWorkload(uid="x", info=None)),
        'ProtocolError("workload_info is required but not present")',
    ),
    "keep after snapshot": ([SNAP], KEEP, 'ProtocolError("pod keep received after snapshot")'),
    "second snapshot": ([SNAP], SNAP, 'ProtocolError("pod snapshot received already")'),
}


@pytest.mark.root
@pytest.mark.parametrize("kind", sorted(FATAL))
def test_a_protocol_error_is_nacked_and_ztunnel_exits_non_zero_with_the_reason(
    agent: FakeNodeAgent,
    start_ztunnel: Callable[..., ZtunnelProc],
    make_pod: Callable[[], Pod],
    kind: str,
) -> None:
    before, payload, expected = FATAL[kind]
    pod = make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    wait_until(lambda: pod_ports(pod, z.pid), "listeners")
    for record in before:
        assert conn.request(record) == Ack()
    fds = [os.open(pod.path, os.O_RDONLY)] if payload.startswith(b"\x0a") else []
    try:
        conn.send(payload, fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert decode_ack(conn.recv()).error == f"failure to process message : {expected}"
    conn.expect_closed()
    assert z.wait_exit() == 1
    assert f"stopped for good: failure to process message : {expected}" in z.output()
    assert not listening(pod.name), "the listeners died with the process"


# =============================================================================================
# Reconnecting
# =============================================================================================


@pytest.mark.root
def test_reconnect_with_backoff_while_the_node_agent_is_away_then_reconcile(
    tmp_path: Any, make_pod: Callable[[], Pod]
) -> None:
    a, b = make_pod(), make_pod()
    path = str(tmp_path / "later.sock")
    z = ZtunnelProc(path, str(tmp_path / "z.log"))
    agent: FakeNodeAgent | None = None
    try:
        # Nobody listens yet: ztunnel keeps trying, not ready.
        wait_until(lambda: "failed to connect to the node agent" in z.output(), "a failed connect")
        assert z.ready_status() == 500
        agent = FakeNodeAgent(path)
        conn = agent.connect_and_hello()
        assert conn.add("uid-a", a.path) == Ack()
        assert conn.add("uid-b", b.path) == Ack()
        assert conn.snapshot() == Ack()
        wait_until(lambda: z.ready_status() == 200, "ready")
        listeners_a = pod_ports(a, z.pid)
        assert sorted(listeners_a) == list(PORTS)
        # The node agent goes away (restart): not ready, and back.
        failed_connects = z.output().count("failed to connect to the node agent")
        agent.close()
        wait_until(lambda: z.ready_status() == 500, "not ready while the node agent is away")
        assert z.config_dump()["zds"]["connected"] is False
        wait_until(
            lambda: z.output().count("failed to connect to the node agent") > failed_connects,
            "a failed connect while the node agent is away",
        )
        agent = FakeNodeAgent(path)
        conn = agent.connect_and_hello()
        # The new snapshot names only a: b is dropped, a is untouched.
        assert conn.add("uid-a", a.path) == Ack()
        assert z.ready_status() == 500, "not ready before SnapshotSent"
        assert conn.snapshot() == Ack()
        wait_until(lambda: not pod_ports(b, z.pid), "b dropped by the reconcile")
        assert pod_ports(a, z.pid) == listeners_a, "a's listening sockets are the same ones"
        wait_until(lambda: z.ready_status() == 200, "ready again")
        assert z.workload_states() == {"uid-a": "Up"}
        assert z.metrics()["zds_ztunnel_connections_total"] == 2
    finally:
        z.stop(signal.SIGKILL)
        if agent is not None:
            agent.close()


def test_backoff_doubles_from_10ms_to_15s_with_jitter() -> None:
    exact = Backoff(jitter=0.0)
    delays = [exact.next() for _ in range(15)]
    assert delays[:4] == [0.01, 0.02, 0.04, 0.08]
    assert delays[-1] == 15.0 and max(delays) == 15.0
    assert all(b >= a for a, b in itertools.pairwise(delays))
    exact.reset()
    assert exact.next() == 0.01
    low, high = Backoff(rand=lambda: 0.0), Backoff(rand=lambda: 0.999999)
    assert low.next() == pytest.approx(0.008) and high.next() == pytest.approx(0.012, rel=1e-3)
    jittered = Backoff()
    assert len({round(jittered.next() / (0.01 * 2**i), 6) for i in range(8)}) > 1, "jitter varies"


# =============================================================================================
# Established connections survive a reconnect (in-process, with a holding handler)
# =============================================================================================


class InProcessZtunnel:
    """A Ztunnel served by its own event loop in a thread (signals stay with pytest)."""

    def __init__(
        self,
        config: ZtunnelConfig,
        handlers: dict[str, Any],
        parts: ZtunnelParts | None = None,
        handover: Handover | None = None,
    ) -> None:
        self.ztunnel = Ztunnel(config, handlers, parts=parts, handover=handover)
        self._started = threading.Event()
        self.code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="ztunnel", daemon=True)
        self._thread.start()
        assert self._started.wait(15), "in-process ztunnel did not start"

    def _main(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            self._started.set()
            self.code = await self.ztunnel.serve(self.stop_event)

        try:
            asyncio.run(serve())
        except BaseException as exc:
            self.error = exc
            self._started.set()

    def get(self, name: str, path: str) -> tuple[int, str]:
        address = wait_until(lambda: self.ztunnel.http.bound.get(name), f"{name} bound")
        return http_get(f"http://{address}{path}")

    def ended(self, within: float) -> bool:
        """Whether it stopped on its own within ``within`` seconds."""
        self._thread.join(within)
        return not self._thread.is_alive()

    def close(self) -> int | None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self._thread.join(30)
        assert not self._thread.is_alive(), "in-process ztunnel did not stop"
        if self.error:
            raise self.error
        return self.code


def echoing_ztunnel(agent: FakeNodeAgent) -> InProcessZtunnel:
    """An in-process ztunnel side whose outbound listener echoes, drained for up to 60 s at a
    stop, without HTTP endpoints."""
    config = ZtunnelConfig(
        zds_socket=agent.path,
        admin_listen="off",
        readiness_listen="off",
        metrics_listen="off",
        drain_timeout=60,
    )
    return InProcessZtunnel(config, {"outbound": echo})


async def echo(conn: AcceptedConnection) -> None:
    loop = asyncio.get_running_loop()
    conn.sock.setblocking(False)
    while data := await loop.sock_recv(conn.sock, 4096):
        await loop.sock_sendall(conn.sock, data)


def assert_cut(client: socket.socket) -> None:
    """The established connection ``client`` was cut (EOF or a reset); closed then."""
    try:
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(16) == b"", "the established connection is cut"
    finally:
        client.close()


def connect_in_pod(pod: Pod, port: int) -> socket.socket:
    """A TCP connection made from inside the pod to its own ``port`` (over loopback)."""
    with open_netns(pod.path) as handle, in_netns(handle):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


@pytest.mark.root
def test_a_new_snapshot_leaves_enrolled_pods_and_their_connections_alone(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    kept, dropped = make_pod(), make_pod()
    config = ZtunnelConfig(
        zds_socket=agent.path,
        admin_listen="127.0.0.1:0",
        readiness_listen="127.0.0.1:0",
        metrics_listen="off",
    )
    zt = InProcessZtunnel(config, {"outbound": echo})
    try:
        conn = agent.connect_and_hello()
        assert conn.add("kept", kept.path) == Ack()
        assert conn.add("dropped", dropped.path) == Ack()
        assert conn.snapshot() == Ack()
        c1 = connect_in_pod(kept, 15001)
        c2 = connect_in_pod(dropped, 15001)
        for c in (c1, c2):
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        conn.close()  # the node agent restarts
        conn = agent.connect_and_hello()
        assert conn.add("kept", kept.path) == Ack()
        assert conn.snapshot() == Ack()
        # The kept pod's established connection is still served...
        c1.sendall(b"still")
        assert c1.recv(5) == b"still"
        # ... and the dropped pod's was closed with its proxy.
        assert c2.recv(16) == b""
        with pytest.raises(ConnectionRefusedError):
            connect_in_pod(dropped, 15001)
        _, body = zt.get("admin", "/config_dump")
        assert sorted(json.loads(body)["workloadState"]) == ["kept"]
        c1.close()
        c2.close()
    finally:
        code = zt.close()
    assert code == 0
    with pytest.raises(ConnectionRefusedError):
        connect_in_pod(kept, 15001)


@pytest.mark.root
def test_a_stop_closes_listeners_at_once_and_lets_established_connections_finish(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    zt = echoing_ztunnel(agent)
    stopper: threading.Thread | None = None
    try:
        conn = agent.connect_and_hello()
        assert conn.add("uid-a", pod.path) == Ack()
        client = connect_in_pod(pod, 15001)
        client.sendall(b"hi")
        assert client.recv(2) == b"hi"
        stopper = threading.Thread(target=zt.close)
        stopper.start()
        conn.expect_closed()  # it stopped reading from the node agent...

        def refused() -> bool:  # ... and closed its listeners
            try:
                connect_in_pod(pod, 15001).close()
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # The probe's handshake finished into the listener's queue just as it was
                # closed: the kernel resets what was queued there. Closed all the same.
                return True
            return False

        wait_until(refused, "the listener to close")
        client.sendall(b"still here")
        assert client.recv(10) == b"still here", "the established connection is drained, not cut"
        assert stopper.is_alive(), "the stop waits for the connection"
        client.close()
        stopper.join(30)
        assert not stopper.is_alive()
        assert zt.code == 0
    finally:
        if stopper is None:
            zt.close()
        elif stopper.is_alive():
            stopper.join(60)


@pytest.mark.root
def test_a_stop_signal_while_draining_closes_the_connections_still_open_at_once(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    """ztunnel's "Double Ctrl+C, exit immediately": a second stop signal while established
    connections drain (60 s here) ends them now (zds waited the whole drain, the signal not
    even said)."""
    pod = make_pod()
    zt = echoing_ztunnel(agent)
    try:
        conn = agent.connect_and_hello()
        assert conn.add("uid-a", pod.path) == Ack()
        client = connect_in_pod(pod, 15001)
        client.settimeout(15)
        client.sendall(b"hi")
        assert client.recv(2) == b"hi"
        zt.loop.call_soon_threadsafe(zt.ztunnel.stop_signal, zt.stop_event)  # the first: draining
        conn.expect_closed()
        client.sendall(b"still here")
        assert client.recv(10) == b"still here", "drained, not cut"
        zt.loop.call_soon_threadsafe(zt.ztunnel.stop_signal, zt.stop_event)  # the second
        assert_cut(client)
        assert zt.ended(within=15), "it exits without waiting out the drain"
    finally:
        code = zt.close()
    assert code == 0


@pytest.mark.root
def test_once_its_faults_took_effect_the_client_is_back_on_the_path_without_faults(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod], tmp_path: Any
) -> None:
    """Every record went through the faults' checks for the life of the process after one
    fault was armed (the busy poll off with them); GET /faults still lists it."""
    faults = faults_file(
        tmp_path / "faults.jsonl", {"kind": "nack-adds", "text": "failure to start proxy : no"}
    )
    config = ZtunnelConfig(
        zds_socket=agent.path,
        admin_listen="off",
        readiness_listen="off",
        metrics_listen="off",
        proxy=ProxySettings(listeners=False),
        faults_file=faults,
    )
    zt = InProcessZtunnel(config, {})
    try:
        conn = agent.connect_and_hello()
        assert zt.ztunnel.client.faults is zt.ztunnel.faults
        assert conn.add("uid-a", make_pod().path) == Ack(error="failure to start proxy : no")
        assert conn.snapshot() == Ack()
        assert conn.add("uid-b", make_pod().path) == Ack()
        assert zt.ztunnel.client.faults is None
        assert [f.state for f in zt.ztunnel.faults.faults] == ["applied"]
    finally:
        zt.close()


@pytest.mark.root
def test_a_protocol_error_cuts_established_connections_at_once_as_ztunnel_exits(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    """ztunnel exits at once on a ProtocolError (process::exit): no drain, whatever
    --drain-timeout says (zds waited for it, 60 s here, before exiting 1)."""
    pod = make_pod()
    zt = echoing_ztunnel(agent)
    try:
        conn = agent.connect_and_hello()
        assert conn.add("uid-a", pod.path) == Ack()
        assert conn.snapshot() == Ack()
        client = connect_in_pod(pod, 15001)
        client.settimeout(15)
        client.sendall(b"hi")
        assert client.recv(2) == b"hi"
        conn.send(SNAP)
        assert decode_ack(conn.recv()).error.startswith("failure to process message : ProtocolError(")
        assert_cut(client)
        assert zt.ended(within=15), "it exits without waiting for the drain timeout"
    finally:
        code = zt.close()
    assert code == 1


# =============================================================================================
# Draining, HTTP endpoints, protocol-only mode
# =============================================================================================


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_reading_closes_every_listener_and_exits_0(
    agent: FakeNodeAgent,
    start_ztunnel: Callable[..., ZtunnelProc],
    make_pod: Callable[[], Pod],
    sig: int,
) -> None:
    a, b = make_pod(), make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", a.path) == Ack()
    assert conn.add("uid-b", b.path) == Ack()
    assert conn.snapshot() == Ack()
    wait_until(lambda: pod_ports(a, z.pid) and pod_ports(b, z.pid), "listeners")
    z.proc.send_signal(sig)
    conn.expect_closed()
    assert z.wait_exit() == 0, z.output()
    assert "draining" in z.output()
    assert not listening(a.name) and not listening(b.name)


@pytest.mark.root
def test_stop_signals_that_keep_coming_during_the_stop_do_not_cut_it_short(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    """A second Ctrl-C, a supervisor repeating its SIGTERM: the handlers were removed once the
    stop was over, and a signal then met the default: killed by it (25 of 25 runs under a
    signal every 2 ms), its last lines lost, now and then a KeyboardInterrupt traceback."""
    pod = make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    assert conn.snapshot() == Ack()
    while z.proc.poll() is None:  # (polled: the pid stays ours until it is reaped)
        z.proc.send_signal(random.choice([signal.SIGTERM, signal.SIGINT, signal.SIGHUP]))
        time.sleep(0.002)  # pacing: signals one after another, not synchronisation
    assert z.proc.returncode == 0, z.output()
    assert "Traceback" not in z.output()
    assert z.output().rstrip().endswith("zds ztunnel stopped"), z.output()[-500:]
    assert not listening(pod.name)


@pytest.mark.root
def test_config_dump_readiness_and_metrics_follow_the_state(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert z.ready_status() == 500, "not ready before the snapshot"
    info = WorkloadInfo(name="productpage-v1", namespace="bookinfo", service_account="bookinfo-productpage")
    assert conn.add("pod-uid-1", pod.path, info) == Ack()
    assert z.ready_status() == 500
    assert conn.snapshot() == Ack()
    assert z.ready_status() == 200
    assert z.get("readiness", "/healthz/ready")[1] == "ready\n"
    for method in ("HEAD", "POST"):  # ztunnel's readiness answers GET only, with an empty 405
        request = urllib.request.Request(f"http://{z.address('readiness')}/healthz/ready", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert (refused.value.code, refused.value.read()) == (405, b""), method
    dump = z.config_dump()
    w = dump["workloadState"]["pod-uid-1"]
    assert w["state"] == "Up"
    assert w["info"] == {
        "name": "productpage-v1",
        "namespace": "bookinfo",
        "serviceAccount": "bookinfo-productpage",
    }
    st = os.stat(pod.path)
    assert w["netns"] == {"dev": st.st_dev, "ino": st.st_ino}
    assert [entry["name"] for entry in w["listeners"]] == ["outbound", "inbound", "hbone", "dns", "dns"]
    assert w["lastError"] is None
    assert dump["zds"]["connected"] is True and dump["zds"]["connectionState"] == "synced"
    metrics = z.metrics()
    assert metrics["workload_manager_active_proxy_count"] == 1
    assert metrics["workload_manager_pending_proxy_count"] == 0
    assert metrics["workload_manager_proxies_started_total"] == 1
    assert metrics["workload_manager_proxies_stopped_total"] == 0
    assert metrics['zds_ztunnel_requests_total{kind="add"}'] == 1
    assert metrics["zds_ztunnel_ready"] == 1
    status, text = z.get("metrics", "/metrics")
    assert "# TYPE workload_manager_proxies_started counter" in text  # (ztunnel's: without _total)
    assert "# TYPE workload_manager_active_proxy_count gauge" in text
    assert text.endswith("\n# EOF\n")
    assert z.get("metrics", "/stats/prometheus") == (status, text)
    # The same text; its Content-Type as ztunnel's: OpenMetrics only when the client asks for it.
    for accept, expected in ((None, PLAIN_TEXT), (PROMETHEUS_ACCEPT, OPENMETRICS)):
        request = urllib.request.Request(f"http://{z.address('metrics')}/metrics")
        if accept is not None:
            request.add_header("Accept", accept)
        with urllib.request.urlopen(request, timeout=10) as got:
            assert (got.headers["Content-Type"], got.read().decode()) == (expected, text)
    request = urllib.request.Request(
        f"http://{z.address('metrics')}/metrics", headers={"Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(request, timeout=10) as got:  # (compressed when asked, as ztunnel's)
        assert got.headers["Content-Encoding"] == "gzip" and gzip.decompress(got.read()).decode() == text
        assert got.headers["Vary"] == "accept-encoding"
    assert conn.delete("pod-uid-1") == Ack()
    assert z.config_dump()["workloadState"] == {}
    metrics = z.metrics()
    assert metrics["workload_manager_active_proxy_count"] == 0
    assert metrics["workload_manager_proxies_stopped_total"] == 1
    # Elsewhere an empty 404 on each of the three, and /metrics for any method, as ztunnel's
    # (hyper_util::empty_response; its stats server matches the path only).
    for name in ("admin", "readiness", "metrics"):
        assert z.get(name, "/nope") == (404, ""), name
    request = urllib.request.Request(f"http://{z.address('metrics')}/metrics", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as got:
        assert got.read().decode().endswith("\n# EOF\n")
    request = urllib.request.Request(f"http://{z.address('admin')}/config_dump", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as got:
        assert json.loads(got.read())["workloadState"] == {}


def test_ztunnels_own_netns_is_refused_unless_allowed(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    z = start_ztunnel("--no-listeners")
    conn = agent.connect_and_hello()
    nack = conn.add("node", "/proc/self/ns/net")  # the same netns as ztunnel's: the node's
    assert nack.error.startswith(
        "failure to start proxy : the netns fd of node is ztunnel's own network namespace"
    )
    assert conn.snapshot() == Ack()
    assert z.config_dump()["workloadState"]["node"]["state"] == "Pending"
    assert z.stop() == 0


def test_no_listeners_mode_acks_checks_the_netns_and_opens_nothing(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    # No root needed: our own netns is a netns anyone can open (and --allow-own-netns lets
    # ztunnel serve it: it is the node's).
    z = start_ztunnel("--no-listeners", "--allow-own-netns")
    conn = agent.connect_and_hello()
    assert conn.add("own-netns", "/proc/self/ns/net") == Ack()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        nack = conn.request(AddWorkload(uid="devnull", info=INFO), [fd])
    finally:
        os.close(fd)
    assert nack.error == "failure to start proxy : the netns fd of devnull is not a network namespace"
    assert conn.snapshot() == Ack()
    dump = z.config_dump()
    assert dump["workloadState"]["own-netns"]["state"] == "Up"
    assert dump["workloadState"]["own-netns"]["listeners"] == []
    assert dump["workloadState"]["devnull"]["state"] == "Pending"
    assert dump["zds"]["listeners"] is False
    # "own-netns" is this (the host's) netns: with listeners on, ztunnel would listen here.
    mine = socket_inodes(z.pid)
    assert not [lst for lst in listening(None) if lst.inode in mine and lst.port in PORTS]
    assert z.stop() == 0


def test_a_uid_with_a_line_break_is_escaped_in_the_nack_and_every_log_line(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    """A peer's uid went as it was into the nack's text and the proxy's and the retry's log
    lines (the structured fields were quoted, the messages not): a forged log line."""
    z = start_ztunnel("--no-listeners", "--retry-interval", "1")
    conn = agent.connect_and_hello()
    uid = "x\n2026-12-04T00:00:00.000Z error forged"
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        nack = conn.request(AddWorkload(uid=uid, info=INFO), [fd])
    finally:
        os.close(fd)
    shown = "x\\n2026-12-04T00:00:00.000Z error forged"
    assert nack.error == f"failure to start proxy : the netns fd of {shown} is not a network namespace"
    assert conn.snapshot() == Ack()
    z.wait_for_output(f"scheduling retry of pending workloads in 1s: {shown}")
    z.wait_for_output(f"failed to start proxy: the netns fd of {shown} is not")
    assert not [line for line in z.output().splitlines() if line.startswith("2026-12-04T00:00:00.000Z")]
    assert z.stop() == 0


def test_a_nack_that_says_a_long_uid_fits_the_record_a_node_agent_reads(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    """A 317-byte Add whose uid is 300 DELs (each said as its 4-character escape) was nacked
    in 1,274 bytes: a truncated message for a node agent reading 1,024 (Istio's ended the
    connection, and the snapshot sent the same Add again)."""
    z = start_ztunnel("--no-listeners")
    conn = agent.connect_and_hello()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        conn.send(encode_request(AddWorkload(uid="\x7f" * 300, info=INFO)), [fd])
    finally:
        os.close(fd)
    reply = conn.recv()
    assert 1000 < len(reply) <= 1024, len(reply)
    error = decode_ack(reply).error
    assert error.startswith("failure to start proxy : the netns fd of \\x7f") and error.endswith("..."), error
    assert conn.snapshot() == Ack()  # the connection goes on
    assert z.stop() == 0


def test_http_listen_flags_are_checked(tmp_path: Any) -> None:
    cmd = [sys.executable, "-m", "zds", "ztunnel", "--zds-socket", str(tmp_path / "x.sock"), "--no-listeners"]
    bad = subprocess.run([*cmd, "--admin-listen", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--admin-listen" in bad.stderr and "HOST:PORT" in bad.stderr
    same = subprocess.run(
        [*cmd, "--outbound-port", "15006", "--admin-listen", "off"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same.returncode == 2 and "must differ" in same.stderr
    with taken_port() as port:
        busy = subprocess.run(
            [
                *cmd,
                "--metrics-listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                "off",
                "--readiness-listen",
                "off",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "--metrics-listen" in busy.stderr


# =============================================================================================
# Listener construction (unit level)
# =============================================================================================


@pytest.mark.root
def test_listeners_are_all_or_nothing(make_pod: Callable[[], Pod]) -> None:
    pod = make_pod()
    before = os.readlink("/proc/thread-self/ns/net")
    with open_netns(pod.path) as handle:
        with in_netns(handle):
            squatter = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            squatter.bind(("::", 15008))
            squatter.listen()
        try:
            specs = (
                ListenerSpec("outbound", 15001),
                ListenerSpec("inbound", 15006),
                ListenerSpec("hbone", 15008),
            )
            with pytest.raises(ListenerError) as err:
                open_listeners(handle.fileno(), specs)
            assert str(err.value).startswith("Bind([::]:15008, [Errno 98]")
            assert not {15001, 15006} & {lst.port for lst in listening(pod.name)}, "the first two were closed"
        finally:
            squatter.close()
        made = open_listeners(handle.fileno(), specs)
        try:
            assert [lst.address for lst in made] == ["[::]:15001", "[::]:15006", "[::]:15008"]
            for lst in made:
                assert lst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 1337
                assert lst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
                assert lst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                assert lst.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        finally:
            for lst in made:
                lst.sock.close()
    assert os.readlink("/proc/thread-self/ns/net") == before, "the thread came back to its own netns"


@pytest.mark.root
def test_without_ipv6_in_the_kernel_listeners_fall_back_to_ipv4(
    make_pod: Callable[[], Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel booted with ipv6.disable=1 refuses AF_INET6 sockets; this one has IPv6,
    # so that refusal is simulated (the only stand-in in this file).
    real_socket = socket.socket

    def no_ipv6(family: int = -1, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    pod = make_pod()
    monkeypatch.setattr(socket, "socket", no_ipv6)
    with open_netns(pod.path) as handle:
        made = open_listeners(handle.fileno(), (ListenerSpec("outbound", 15001),))
    monkeypatch.undo()
    try:
        assert [lst.address for lst in made] == ["0.0.0.0:15001"]
        assert made[0].sock.family == socket.AF_INET
    finally:
        for lst in made:
            lst.sock.close()


#: Prometheus's default scrape Accept (ztunnel's src/metrics/server.rs tests it so).
PROMETHEUS_ACCEPT = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,"
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)

#: ztunnel's in-pod metrics as its prometheus-client crate writes them (src/inpod/metrics.rs,
#: registered under "workload_manager" in src/app.rs; the crate adds the full stop), all 0 yet.
ZTUNNEL_INPOD_METRICS = """\
# HELP workload_manager_active_proxy_count The total number current workloads with active proxies (unstable).
# TYPE workload_manager_active_proxy_count gauge
workload_manager_active_proxy_count 0
# HELP workload_manager_pending_proxy_count The total number current workloads with pending proxies (unstable).
# TYPE workload_manager_pending_proxy_count gauge
workload_manager_pending_proxy_count 0
# HELP workload_manager_proxies_started The total number of proxies that were started (unstable).
# TYPE workload_manager_proxies_started counter
workload_manager_proxies_started_total 0
# HELP workload_manager_proxies_stopped The total number of proxies that were stopped (unstable).
# TYPE workload_manager_proxies_stopped counter
workload_manager_proxies_stopped_total 0
"""


def test_metrics_are_ztunnels_openmetrics_text() -> None:
    text = ZtunnelMetrics().render()
    assert text.startswith(ZTUNNEL_INPOD_METRICS) and text.endswith("\n# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]  # (refuses what is not OpenMetrics)
    assert families["workload_manager_proxies_started"].type == "counter"
    assert [s.name for s in families["zds_ztunnel_connections"].samples] == ["zds_ztunnel_connections_total"]


def test_the_metrics_content_type_is_chosen_from_accept_as_ztunnel_does() -> None:
    assert content_type([]) == PLAIN_TEXT == "text/plain; charset=utf-8"
    assert content_type(["application/json", "application/openmetrics-text; other stuff"]) == OPENMETRICS
    assert OPENMETRICS == "application/openmetrics-text;charset=utf-8;version=1.0.0"
    assert content_type([PROMETHEUS_ACCEPT]) == OPENMETRICS
    assert content_type(["APPLICATION/OpenMetrics-Text"]) == OPENMETRICS
    assert content_type(["application/json"]) == PLAIN_TEXT
    # ztunnel splits on commas and does not trim: after ", " it is not the name.
    assert content_type(["text/plain, application/openmetrics-text"]) == PLAIN_TEXT


def test_the_metrics_coding_follows_accept_encodings_q_values() -> None:
    for accept_encoding, coding in (
        ("", None),
        ("gzip", "gzip"),
        ("gzip, deflate", "gzip"),  # (aiohttp's own choice would be deflate: the first it finds)
        ("deflate, gzip, br, zstd", "gzip"),
        ("deflate", "deflate"),
        ("gzip;q=0.5, deflate", "deflate"),
        ("gzip;q=0", None),
        ("br", None),
        ("*", "gzip"),
        ("*;q=0", None),
        ("GZIP", "gzip"),
    ):
        assert metrics_coding(accept_encoding) == coding, accept_encoding


def test_metrics_text_format() -> None:
    m = ZtunnelMetrics()
    m.inc("workload_manager_proxies_started_total")
    m.inc("zds_ztunnel_nacks_total", reason='we"ird')
    m.observe("workload_manager_active_proxy_count", lambda: 3)
    text = m.render()
    assert "workload_manager_proxies_started_total 1\n" in text
    assert "workload_manager_active_proxy_count 3\n" in text
    assert 'zds_ztunnel_nacks_total{reason="we\\"ird"} 1\n' in text
    assert (
        "# HELP workload_manager_pending_proxy_count The total number current workloads with pending" in text
    )
    with pytest.raises(TypeError):
        m.set("workload_manager_proxies_started_total", 4)
    with pytest.raises(ValueError):
        m.inc("workload_manager_proxies_started_total", -1)


@pytest.mark.root
def test_a_fatal_error_stops_for_good_even_when_the_node_agent_hung_up_first(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    z = start_ztunnel("--no-listeners")
    conn = agent.connect_and_hello()
    assert conn.snapshot() == Ack()
    conn.send(encode_request(KeepWorkload(uid="late")))  # Keep after SnapshotSent: fatal
    conn.close()  # ... and gone before the nack can be written
    assert z.wait_exit() == 1
    assert "stopped for good" in z.output()


@pytest.mark.root
def test_after_a_read_error_ztunnel_reconnects_at_once_every_time(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    """ztunnel reconnects straight away after a read error; no backoff builds up between
    bad records (the last accept would time out if it did: after 10 failures a doubling
    backoff from 10 ms waits about 10 s, far more than the 3 s allowed here)."""
    start_ztunnel("--no-listeners")
    for _ in range(10):
        conn = agent.accept(timeout=15)
        conn.hello()
        conn.send(b"\x0a\xff\xff")  # undecodable
        assert decode_ack(conn.recv()).error.startswith("failure to read message : ")
        conn.expect_closed()
    conn = agent.accept(timeout=3.0)
    conn.hello()


@pytest.mark.root
def test_a_node_agent_that_hangs_up_before_answering_gets_a_growing_backoff_until_it_answers(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    """Connections closed before the hello is answered wait a backoff that grows (ztunnel's
    announce-error backoff, reset only once ready); the connect succeeding each time had
    started it over, so zds reconnected every ~10 ms for good (~70 connections a second).
    Once the node agent answers, the next unanswered connection starts from 10 ms again."""
    z = start_ztunnel("--no-listeners")
    for _ in range(7):
        agent.accept().close()
    agent.connect_and_hello().snapshot()  # answered ...
    agent.conns[-1].close()  # ... then gone: ztunnel reconnects at once
    agent.accept().close()
    said = "the node agent closed the connection before answering the hello"
    z.wait_for_output(said, timeout=5)
    wait_until(lambda: z.output().count(said) == 8, "the eighth unanswered connection's line")
    delays = [
        float(line.rsplit("retrying in ", 1)[1].rstrip("s"))
        for line in z.output().splitlines()
        if said in line
    ]
    assert all(0.008 <= d <= 0.012 for d in (delays[0], delays[7])), delays  # 10 ms +- 20%
    assert all(later > earlier for earlier, later in itertools.pairwise(delays[:7])), delays
    assert delays[6] >= 0.5, delays  # 640 ms +- 20%


@pytest.mark.root
@pytest.mark.parametrize("kind", ["a directory", "a regular file", "a FIFO"])
def test_a_zds_socket_path_that_is_no_socket_is_said_and_retried_until_a_node_agent_is_there(
    kind: str, tmp_path: Any
) -> None:
    """It was "Connection refused (is it running?)" for good, as for a socket nothing listens
    on. Retried all the same, as ztunnel retries every failed connect: a node agent that starts
    there replaces what is in the way (Istio's removes it before it binds)."""
    path = str(tmp_path / "ztunnel.sock")
    if kind == "a directory":
        os.mkdir(path)
    elif kind == "a FIFO":
        os.mkfifo(path)
    else:
        open(path, "x").close()
    z = ZtunnelProc(path, str(tmp_path / "ztunnel.log"), "--no-listeners")
    agent: FakeNodeAgent | None = None
    try:
        z.wait_for_output(
            f"failed to connect to the node agent over {path}: it is {kind}, not a socket (is --zds-socket "
            "the node agent's socket?); retrying in "
        )
        time.sleep(0.5)  # (a few more attempts, the backoff growing)
        (os.rmdir if kind == "a directory" else os.unlink)(path)
        agent = FakeNodeAgent(path)
        assert agent.connect_and_hello().snapshot() == Ack()
    finally:
        z.stop(signal.SIGKILL)
        if agent is not None:
            agent.close()


# =============================================================================================
# The first snapshot, taken before the event loop (zds.client.session)
# =============================================================================================


class FirstSnapshot:
    """``take_first_snapshot`` in a thread (the test drives the node agent meanwhile)."""

    def __init__(self, config: ZtunnelConfig, within: float = 10.0) -> None:
        self.config = config
        self.parts = ZtunnelParts.build(config)
        self.handover: Handover | None = None
        self._thread = threading.Thread(target=self._main, args=(config, within), daemon=True)
        self._thread.start()

    def _main(self, config: ZtunnelConfig, within: float) -> None:
        self.handover = self.parts.take_first_snapshot(config, within)

    def result(self) -> Handover:
        self._thread.join(15)
        assert not self._thread.is_alive(), "the first snapshot did not end"
        assert self.handover is not None, "no connection was made"
        return self.handover

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def carry_on(self, handlers: dict[str, Any] | None = None) -> InProcessZtunnel:
        """The event loop's half, given what this one did."""
        return InProcessZtunnel(self.config, handlers or {}, self.parts, self.result())


def first_snapshot_config(agent: FakeNodeAgent) -> ZtunnelConfig:
    return ZtunnelConfig(
        zds_socket=agent.path,
        admin_listen="127.0.0.1:0",
        readiness_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
    )


@pytest.mark.root
def test_the_first_snapshot_is_answered_before_the_event_loop_and_the_loop_carries_on(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    a, b = make_pod(), make_pod()
    config = first_snapshot_config(agent)
    first = FirstSnapshot(config)
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", a.path) == Ack()
    assert conn.snapshot() == Ack()
    handover = first.result()
    assert handover.answered and handover.reconciled and not handover.timed_out
    assert handover.work is None and handover.error is None
    assert [proxy.uid for proxy in handover.to_activate] == ["uid-a"]
    assert sorted(pod_ports(a, os.getpid())) == list(PORTS), "a's sockets listen before any loop runs"
    early = connect_in_pod(a, 15001)  # waits in the listener's backlog until the loop serves it
    zt = first.carry_on({"outbound": echo})
    try:
        early.sendall(b"early")
        assert early.recv(16) == b"early", "a connection made before the loop is served once it runs"
        assert conn.add("uid-b", b.path) == Ack(), "the same connection carries on, on the loop"
        status, body = zt.get("admin", "/config_dump")
        assert status == 200
        states = {uid: w["state"] for uid, w in json.loads(body)["workloadState"].items()}
        assert states == {"uid-a": "Up", "uid-b": "Up"}
        assert zt.get("readiness", "/healthz/ready")[0] == 200
        metrics = zt.ztunnel.metrics
        assert metrics.value("zds_ztunnel_connections_total") == 1, "one connection, counted once"
        assert metrics.value("zds_ztunnel_requests_total", kind="add") == 2
        assert metrics.value("workload_manager_proxies_started_total") == 2
    finally:
        early.close()
        assert zt.close() == 0
    assert not pod_ports(a, os.getpid()) and not pod_ports(b, os.getpid())


@pytest.mark.root
def test_a_node_agent_silent_mid_snapshot_hands_the_connection_to_the_loop(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    config = first_snapshot_config(agent)
    first = FirstSnapshot(config, within=0.3)
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    handover = first.result()  # nothing more within 0.3 s
    assert handover.timed_out and handover.answered and not handover.reconciled
    zt = first.carry_on()
    try:
        assert conn.snapshot() == Ack(), "the loop takes the rest of the snapshot"
        assert wait_until(lambda: zt.get("readiness", "/healthz/ready")[0] == 200, "ready")
        assert zt.ztunnel.protocol.workloads["uid-a"].state.admin_name == "Up"
    finally:
        code = zt.close()
    assert code == 0


@pytest.mark.root
def test_a_fatal_record_in_the_first_snapshot_is_nacked_and_stops_the_ztunnel_as_on_the_loop(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    config = first_snapshot_config(agent)
    first = FirstSnapshot(config)
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    _, payload, expected = FATAL["add without workload_info"]
    fd = os.open(pod.path, os.O_RDONLY)
    try:
        conn.send(payload, [fd])
    finally:
        os.close(fd)
    assert decode_ack(conn.recv()).error == f"failure to process message : {expected}"
    handover = first.result()
    assert not handover.reconciled
    assert handover.work is not None
    assert [type(event).__name__ for event in handover.work.queue] == ["CloseConnection"], "the loop's to do"
    zt = first.carry_on()
    conn.expect_closed()
    assert zt.close() == 1
    assert zt.ztunnel.protocol.fatal_error == f"failure to process message : {expected}"
    assert not pod_ports(pod, os.getpid()), "the listeners were closed"


@pytest.mark.root
def test_a_stop_signal_while_the_first_snapshot_is_taken_stops_gracefully(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    assert pod_ports(pod, z.pid), "listening already (before the event loop)"
    z.proc.send_signal(signal.SIGTERM)  # no SnapshotSent yet: still in the blocking part
    conn.expect_closed()
    assert z.wait_exit() == 0, z.output()
    assert "zds ztunnel stopped" in z.output()
    assert not listening(pod.name)


@pytest.mark.root
def test_a_send_that_fails_in_the_first_snapshot_ends_the_connection_as_on_the_loop(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    first = FirstSnapshot(first_snapshot_config(agent))
    conn = agent.connect_and_hello()
    conn.sock.shutdown(socket.SHUT_RD)  # the ack of what comes next cannot be written
    fd = os.open(pod.path, os.O_RDONLY)
    try:
        conn.send(encode_request(AddWorkload(uid="uid-a", info=WorkloadInfo("pod-a", "default", "sa"))), [fd])
    finally:
        os.close(fd)
    handover = first.result()
    assert isinstance(handover.error, OSError) and handover.work is not None
    assert [proxy.uid for proxy in handover.work.started] == ["uid-a"], "started, its ack not out"
    assert not handover.to_activate
    zt = first.carry_on()
    try:
        conn2 = agent.connect_and_hello()  # at once: the node agent had answered the hello
        assert conn2.add("uid-a", pod.path) == Ack()
        assert conn2.snapshot() == Ack()
        metrics = zt.ztunnel.metrics
        assert metrics.value("zds_ztunnel_connections_total") == 2
        assert metrics.value("zds_ztunnel_requests_total", kind="add") == 2, "the failed ack counted too"
        assert zt.ztunnel.protocol.workloads["uid-a"].state.admin_name == "Up"
    finally:
        code = zt.close()
    assert code == 0


@pytest.mark.root
def test_an_empty_record_in_the_first_snapshot_closes_the_connection_as_on_the_loop(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    first = FirstSnapshot(first_snapshot_config(agent))
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    conn.send(b"")  # a 0-byte record: ztunnel reads it as EOF
    handover = first.result()
    assert handover.work is not None and not handover.reconciled
    zt = first.carry_on()
    try:
        conn.expect_closed()
        wait_until(  # (not "closed": it was there)
            lambda: (zt.ztunnel.client.last_error or "").startswith("node agent sent an empty record"),
            "the empty record said as one",
        )
        conn2 = agent.connect_and_hello()
        assert conn2.snapshot() == Ack(), "a new snapshot on a new connection"
        assert zt.ztunnel.metrics.value("zds_ztunnel_connections_total") == 2
    finally:
        code = zt.close()
    assert code == 0


def _send_empty_with_an_fd(conn: FakeConnection) -> None:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        conn.send(b"", [fd])
    finally:
        os.close(fd)


@pytest.mark.root
def test_an_empty_record_from_a_node_agent_still_there_is_said_to_be_one(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    """A 0-byte record ends the connection (as ztunnel reads it: EOF), but a node agent that
    sent one had not closed: "node agent closed the connection" misled whoever tests one."""
    z = start_ztunnel("--no-dns")
    conn = agent.connect_and_hello()
    assert conn.snapshot() == Ack()
    conn.send(b"")  # (its end stays open)
    conn.expect_closed()
    wait_until(lambda: "closing the connection: node agent sent an empty record" in z.output(), "the warning")
    # One that carries an fd too: an EOF never does, so it is a record whatever the peer did.
    withfd = agent.connect_and_hello()
    assert withfd.snapshot() == Ack()
    _send_empty_with_an_fd(withfd)
    withfd.expect_closed()
    wait_until(lambda: z.output().count("node agent sent an empty record") == 2, "said as a record too")
    assert "node agent closed the connection" not in z.output()
    # Nor is it an answer to the hello (ztunnel reads EOF): the backoff of the unanswered.
    first = agent.connect_and_hello()
    _send_empty_with_an_fd(first)
    first.expect_closed()
    wait_until(lambda: "closed the connection before answering the hello" in z.output(), "not answered")
    again = agent.connect_and_hello()  # (it connects again, as after any end)
    assert again.snapshot() == Ack()
    again.close()
    wait_until(lambda: "node agent closed the connection" in z.output(), "a close said as one")


@pytest.mark.root
def test_records_that_keep_coming_past_the_limit_are_left_to_the_loop(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    pod = make_pod()
    config = ZtunnelConfig(
        zds_socket=agent.path,
        admin_listen="off",
        readiness_listen="127.0.0.1:0",
        metrics_listen="off",
        proxy=ProxySettings(listeners=False),
    )
    first = FirstSnapshot(config, within=0.05)
    conn = agent.connect_and_hello()
    sent, unanswered = 0, False
    info = WorkloadInfo(name="pod", namespace="default", service_account="default")
    fd = os.open(pod.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while first.running and sent < 5000:  # one after the other, never a pause
            conn.send(encode_request(AddWorkload(uid=f"uid-{sent}", info=info)), [fd])
            sent += 1
            try:
                assert decode_ack(conn.recv(timeout=1.0)) == Ack()
            except TimeoutError:  # the first snapshot gave up as it came: the loop answers it
                unanswered = True
                break
    finally:
        os.close(fd)
    handover = first.result()
    assert handover.timed_out and not handover.reconciled and sent < 5000
    zt = first.carry_on()
    try:
        if unanswered:
            assert decode_ack(conn.recv()) == Ack()
        assert conn.add(f"uid-{sent}", pod.path) == Ack()
        assert conn.snapshot() == Ack()
        assert wait_until(lambda: zt.get("readiness", "/healthz/ready")[0] == 200, "ready")
        assert len(zt.ztunnel.protocol.workloads) == sent + 1
    finally:
        code = zt.close()
    assert code == 0


@pytest.mark.root
def test_a_proxy_stopped_before_the_loop_ran_is_said_started_then_stopped(
    agent: FakeNodeAgent, make_pod: Callable[[], Pod]
) -> None:
    a, b = make_pod(), make_pod()
    first = FirstSnapshot(first_snapshot_config(agent))
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", a.path) == Ack()
    assert conn.add("uid-b", b.path) == Ack()
    assert conn.delete("uid-a") == Ack()
    assert conn.snapshot() == Ack()
    handover = first.result()
    assert [proxy.uid for proxy in handover.to_activate] == ["uid-a", "uid-b"]
    metrics = first.parts.metrics
    assert metrics.value("workload_manager_proxies_started_total") == 1, "uid-a: said started as it stopped"
    assert metrics.value("workload_manager_proxies_stopped_total") == 1
    zt = first.carry_on()
    try:
        assert wait_until(lambda: zt.get("readiness", "/healthz/ready")[0] == 200, "ready")
        assert metrics.value("workload_manager_proxies_started_total") == 2, "uid-b once served"
        assert list(zt.ztunnel.protocol.workloads) == ["uid-b"]
        assert not pod_ports(a, os.getpid()) and sorted(pod_ports(b, os.getpid())) == list(PORTS)
    finally:
        code = zt.close()
    assert code == 0


def test_its_http_endpoints_keep_at_most_64_connections_and_close_half_requests(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc]
) -> None:
    """Anyone on the node can connect to the admin, readiness and metrics endpoints: 200
    connections that send half a request held 200 fds (and so on, to the fds the pods'
    sockets need). At most 64 are kept, each new one in the place of the oldest (a real
    request is answered meanwhile), and those too once they bring no request within 10 s;
    the endpoint answers after."""
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert conn.snapshot() == Ack()
    wait_until(lambda: z.ready_status() == 200, "ready")
    check_half_requests_bounded(
        z.pid,
        z.address("readiness"),
        b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n",
        z.output,
        "/healthz/ready",
    )
    assert z.ready_status() == 200
    # Each of the 200 counted, closed to make room or at the 10 s: those not said yet (in the
    # 10 s after a first line) are said at the stop.
    assert z.stop() == 0
    counts = re.findall(
        r"HTTP: (\d+) connection\(s\) closed(?: to make room|: no request within 10s)", z.output()
    )
    assert sum(map(int, counts)) == 200, counts


@pytest.mark.parametrize("how", WAYS_OF_WAITING)
def test_its_http_endpoints_let_connections_not_in_a_request_make_room(
    agent: FakeNodeAgent, start_ztunnel: Callable[..., ZtunnelProc], how: str
) -> None:
    """The node agent's guard: 64 connections that asked once and stayed open, read none of
    their answers, or send no body after a head, no longer keep the readiness probe out."""
    z = start_ztunnel()
    conn = agent.connect_and_hello()
    assert conn.snapshot() == Ack()
    wait_until(lambda: z.ready_status() == 200, "ready")
    check_places_not_held(z.address("readiness"), "/healthz/ready", z.output, how=how)
    assert z.ready_status() == 200
    assert "Traceback" not in z.output()


def test_the_traffic_of_workloads_that_are_gone_is_pruned_without_a_scrape() -> None:
    """Counters of each workload that ever relayed a connection were pruned only by a /metrics
    scrape: on a ztunnel side nobody scrapes they grew with every pod that ever came."""
    from zds.client.app import TRAFFIC_SLACK

    ztunnel = Ztunnel(ZtunnelConfig(zds_socket="/nonexistent", admin_listen="off", readiness_listen="off"))
    for i in range(10 * TRAFFIC_SLACK):
        ztunnel.traffic_of(f"gone-{i}").outbound.connections += 1
    assert len(ztunnel.traffic) <= TRAFFIC_SLACK + 2
    assert ztunnel.traffic_of(f"gone-{10 * TRAFFIC_SLACK - 1}").outbound.connections == 1  # (the newest kept)


@pytest.mark.root
@pytest.mark.parametrize("signals", [1, 2])
def test_a_drain_cut_short_leaves_no_never_retrieved_traceback(
    agent: FakeNodeAgent,
    start_ztunnel: Callable[..., ZtunnelProc],
    make_pod: Callable[[], Pod],
    signals: int,
) -> None:
    """The drain ends by its timeout (1 signal) or by a second signal (2) with a connection
    still open: the gather of the proxies' waits was cancelled and never awaited, and asyncio
    logged "_GatheringFuture exception was never retrieved" with a traceback at exit."""
    pod = make_pod()
    z = start_ztunnel("--drain-timeout", "1")
    conn = agent.connect_and_hello()
    assert conn.add("uid-a", pod.path) == Ack()
    assert conn.snapshot() == Ack()
    wait_until(lambda: pod_ports(pod, z.pid), "listeners")
    client = connect_in_pod(pod, 15053)  # an idle TCP DNS connection: still open at the drain's end
    try:
        z.proc.send_signal(signal.SIGTERM)
        if signals == 2:  # the second once the drain waits
            wait_until(lambda: "waiting up to 1s for 1 proxies' connections" in z.output(), "the drain")
            z.proc.send_signal(signal.SIGTERM)
        assert z.wait_exit() == 0, z.output()
    finally:
        client.close()
    assert "never retrieved" not in z.output() and "Traceback" not in z.output(), z.output()
