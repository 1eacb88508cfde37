"""Transparent in-pod redirection end to end: real `zds server` (installing Istio's
rules) and real `zds ztunnel` (relaying), pods on a bridge, real TCP.

app in A -> A:15001 (outbound relay, inside A) -> B:15006 (inbound relay, inside B) -> app in B.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.harness import NodeAgentProc, ZtunnelProc, fd_count, pod_network, wait_until
from zds.netns import in_netns, open_netns
from zds.netns.apps import EchoServer
from zds.netns.apps import exchange as exchange_from
from zds.netns.podnet import PodFixture

pytestmark = pytest.mark.root

APP_PORT = 8080
MIB = os.urandom(1024 * 1024)


def dns_framed(message: bytes) -> bytes:
    """A DNS message as TCP carries it: two bytes of length, then the message."""
    return len(message).to_bytes(2, "big") + message


class FakeResolver:
    """A stand-in for the node's resolver on 127.0.0.1 (UDP and TCP, one port): answers
    each query with ``b"answer:" + query`` (TCP: each message, framed as DNS over TCP frames
    it, two bytes of length first)."""

    def __init__(self) -> None:
        # A port free for both UDP and TCP: the first free UDP port may be taken for TCP.
        for _ in range(50):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        else:
            raise OSError("no port free for both UDP and TCP on 127.0.0.1")
        self.tcp.listen(8)
        for sock in (self.udp, self.tcp):
            sock.settimeout(0.2)
        self.queries: list[bytes] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._serve_udp, self._serve_tcp)]
        for thread in self._threads:
            thread.start()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                query, addr = self.udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            self.queries.append(query)
            self.udp.sendto(b"answer:" + query, addr)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError):  # (a client gone: the next one)
                conn.settimeout(10)
                reader = conn.makefile("rb")
                while len(head := reader.read(2)) == 2:
                    query = reader.read(int.from_bytes(head, "big"))
                    self.queries.append(query)
                    conn.sendall(dns_framed(b"answer:" + query))

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.udp.close()
        self.tcp.close()


@dataclass
class Mesh:
    server: NodeAgentProc
    ztunnel: ZtunnelProc
    pods: dict[str, PodFixture]
    apps: dict[str, EchoServer]
    resolver: FakeResolver
    #: The node agent's --redirect-backend.
    backend: str

    def istio_rules(self, name: str) -> list[str]:
        """Our rules in the pod's netns, as the backend's own tool lists them."""
        argv = ["iptables-save"] if self.backend == "iptables" else ["nft", "list", "ruleset"]
        with open_netns(self.pods[name].netns_path) as ns, in_netns(ns):
            listing = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return [line for line in listing.splitlines() if "ISTIO" in line or "istio" in line]

    def uid(self, name: str) -> str:
        return f"uid-{name}"

    def enroll(self, name: str) -> None:
        self.server.add_pod(self.uid(name), self.pods[name].netns_path, name=name)

    def counters(self, name: str, direction: str) -> dict[str, int]:
        dump: dict[str, Any] = self.ztunnel.config_dump()
        state = dump["workloadState"].get(self.uid(name))
        if state is None:
            return {}
        counters: dict[str, int] = state["traffic"][direction]
        return counters

    def connections(self, name: str, direction: str) -> int:
        return self.counters(name, direction).get("connections", 0)


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The same mesh with either rule backend: every data-path test runs with both."""
    backend: str = request.param
    tmp = tmp_path_factory.mktemp(f"mesh-{backend}")
    tag = secrets.token_hex(2)
    net = pod_network(f"zdsm{tag}")
    server: NodeAgentProc | None = None
    ztunnel: ZtunnelProc | None = None
    apps: dict[str, EchoServer] = {}
    resolver = FakeResolver()
    try:
        pods = {name: net.add_pod(f"zdst-{tag}-{name}") for name in ("a", "b", "c", "d", "e")}
        for name in ("b", "d", "e"):
            apps[name] = EchoServer(pods[name].netns_path, APP_PORT)
        server = NodeAgentProc(str(tmp), "--redirect-backend", backend, redirect=True).wait_ready()
        ztunnel = ZtunnelProc(
            server.zds_socket, str(tmp / "ztunnel.log"), "--dns-upstream", f"127.0.0.1:{resolver.port}"
        )
        ztunnel.address("admin")
        mesh = Mesh(server=server, ztunnel=ztunnel, pods=pods, apps=apps, resolver=resolver, backend=backend)
        wait_until(lambda: mesh.server.connected_count() == 1, what="ztunnel connected")
        for name in ("a", "b", "e"):  # c and d stay out of the mesh
            mesh.enroll(name)
        yield mesh
    finally:
        if ztunnel is not None:
            ztunnel.stop()
        if server is not None:
            server.stop()
        for app in apps.values():
            app.close()
        resolver.close()
        net.close()


def test_a_mebibyte_goes_pod_to_pod_through_both_listeners_and_comes_back_identical(mesh: Mesh) -> None:
    out_before, in_before = mesh.connections("a", "outbound"), mesh.connections("b", "inbound")
    peers_before = len(mesh.apps["b"].peers)
    echoed = exchange_from(mesh.pods["a"].netns_path, mesh.pods["b"].ipv4, APP_PORT, MIB)
    assert echoed == MIB
    wait_until(lambda: mesh.counters("b", "inbound")["active"] == 0, what="the inbound relay to finish")
    assert mesh.connections("a", "outbound") == out_before + 1
    assert mesh.connections("b", "inbound") == in_before + 1
    assert mesh.counters("a", "outbound")["bytesSent"] >= len(MIB)
    assert mesh.counters("b", "inbound")["bytesReceived"] >= len(MIB)
    # The app in B saw the connection arrive, from A's address (ztunnel keeps the source).
    assert len(mesh.apps["b"].peers) == peers_before + 1
    assert mesh.apps["b"].peers[-1] == mesh.pods["a"].ipv4


def test_ipv6_goes_through_both_listeners_too(mesh: Mesh) -> None:
    out_before, in_before = mesh.connections("a", "outbound"), mesh.connections("b", "inbound")
    assert (
        exchange_from(mesh.pods["a"].netns_path, mesh.pods["b"].ipv6, APP_PORT, b"over ipv6\n")
        == b"over ipv6\n"
    )
    wait_until(lambda: mesh.connections("b", "inbound") == in_before + 1, what="B's inbound counter")
    assert mesh.connections("a", "outbound") == out_before + 1


def test_interception_is_real_the_listeners_are_in_the_path(mesh: Mesh) -> None:
    """With the rules in place, A's traffic can only leave through 15001: the outbound
    relay's counter moves even for a destination outside the mesh (D)."""
    before = mesh.connections("a", "outbound")
    d_in_before = mesh.connections("d", "inbound")  # D is not enrolled: no counters at all
    assert exchange_from(mesh.pods["a"].netns_path, mesh.pods["d"].ipv4, APP_PORT, b"to d\n") == b"to d\n"
    wait_until(lambda: mesh.connections("a", "outbound") == before + 1, what="A's outbound counter")
    assert d_in_before == 0 and mesh.counters("d", "inbound") == {}


def test_an_unenrolled_pod_goes_direct(mesh: Mesh) -> None:
    snapshot = {n: (mesh.counters(n, "outbound"), mesh.counters(n, "inbound")) for n in ("a", "b", "e")}
    peers_before = len(mesh.apps["d"].peers)
    assert exchange_from(mesh.pods["c"].netns_path, mesh.pods["d"].ipv4, APP_PORT, b"direct\n") == b"direct\n"
    assert mesh.apps["d"].peers[peers_before:] == [mesh.pods["c"].ipv4]
    assert {
        n: (mesh.counters(n, "outbound"), mesh.counters(n, "inbound")) for n in ("a", "b", "e")
    } == snapshot


def test_fifty_concurrent_connections_all_complete(mesh: Mesh) -> None:
    before = mesh.connections("b", "inbound")
    payloads = [f"connection {i}\n".encode() * 100 for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(
            pool.map(
                lambda p: exchange_from(mesh.pods["a"].netns_path, mesh.pods["b"].ipv4, APP_PORT, p), payloads
            )
        )
    assert answers == payloads
    wait_until(lambda: mesh.connections("b", "inbound") == before + 50, what="50 inbound relays")


def _process_sockets(pid: int) -> Iterator[socket.socket]:
    """Each socket of process ``pid``, as a copy of its fd in this process (pidfd_getfd(2),
    syscall 438 on every architecture); closed after the caller's step."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            fd = libc.syscall(438, pidfd, int(name), 0)
            if fd < 0:
                continue  # (closed meanwhile)
            with socket.socket(fileno=fd) as sock:
                yield sock
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def held_open(mesh: Mesh, name: str, family: int, address: str, line: bytes) -> Iterator[socket.socket]:
    """A connection from pod ``name`` to ``address``:APP_PORT, its line echoed (both relays
    up), held open until the block ends."""
    with open_netns(mesh.pods[name].netns_path) as ns, in_netns(ns):
        client = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with client:
        client.settimeout(10)
        client.connect((address, APP_PORT))
        client.sendall(line)
        assert client.recv(100) == line  # both relays are up
        yield client


def test_both_relays_sockets_have_ztunnels_nodelay_and_keepalive(mesh: Mesh) -> None:
    # ztunnel sets them on every accepted and every upstream socket (proxy.rs, socket.rs):
    # without keepalive a relay whose peer vanished without a FIN (its rules or netns gone
    # mid-connection) stayed open for good.
    with held_open(mesh, "a", socket.AF_INET, mesh.pods["b"].ipv4, b"held open\n") as client:
        ends: list[tuple[int, int, tuple[int, int, int]]] = []  # (local port, peer port, options)
        for sock in _process_sockets(mesh.ztunnel.pid):
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            with contextlib.suppress(OSError):
                ends.append(
                    (
                        sock.getsockname()[1],
                        sock.getpeername()[1],
                        (
                            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        ),
                    )
                )
        # the app's port, ours, and those of the two upstream connections (the inbound
        # relay's client is the outbound relay's upstream)
        ports = {client.getsockname()[1], APP_PORT} | {local for local, peer, _ in ends if peer == APP_PORT}
        options = [o for local, peer, o in ends if {local, peer} & ports]
    # outbound in A: the app's connection and the one to B; inbound in B: A's and the one to the app
    assert len(options) == 4
    assert set(options) == {(1, 1, 180)}


def test_config_dump_lists_each_relayed_connection_as_ztunnels_connection_manager(mesh: Mesh) -> None:
    """ztunnel's config_dump gives an Up workload its ``connections`` (connection_manager.rs),
    which ``istioctl ztunnel-config connections`` reads: without them it listed nothing."""
    a, b = mesh.pods["a"].ipv4, mesh.pods["b"].ipv4
    uid_a, uid_b = mesh.uid("a"), mesh.uid("b")

    def connections(uid: str, direction: str) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = mesh.ztunnel.config_dump()["workloadState"][uid]["connections"][
            direction
        ]
        return listed

    with held_open(mesh, "a", socket.AF_INET, b, b"held open\n") as client:
        src = f"{a}:{client.getsockname()[1]}"
        mine = [c for c in connections(uid_a, "outbound") if c["src"] == src]
        assert mine == [
            {"src": src, "originalDst": f"{b}:{APP_PORT}", "actualDst": f"{b}:{APP_PORT}", "protocol": "TCP"}
        ]
        inbound = connections(uid_b, "inbound")  # (from A's address: the outbound relay's upstream)
        assert any(
            c["src"].startswith(f"{a}:")
            and c["originalDst"] is None
            and c["actualDst"] == f"{b}:{APP_PORT}"
            and c["protocol"] == "TCP"
            for c in inbound
        ), inbound
    wait_until(
        lambda: not any(c["src"] == src for c in connections(uid_a, "outbound")),
        what="A's gone from the list",
    )
    wait_until(lambda: not connections(uid_b, "inbound"), what="B's inbound list empty again")


def test_config_dump_lists_ipv6_connections_as_rust_writes_a_socket_addr(mesh: Mesh) -> None:
    a, b = mesh.pods["a"].ipv6, mesh.pods["b"].ipv6
    with held_open(mesh, "a", socket.AF_INET6, b, b"over ipv6\n") as client:
        src = f"[{a}]:{client.getsockname()[1]}"
        state = mesh.ztunnel.config_dump()["workloadState"]
        outbound = [c for c in state[mesh.uid("a")]["connections"]["outbound"] if c["src"] == src]
        assert outbound == [
            {
                "src": src,
                "originalDst": f"[{b}]:{APP_PORT}",
                "actualDst": f"[{b}]:{APP_PORT}",
                "protocol": "TCP",
            }
        ]
        inbound = state[mesh.uid("b")]["connections"]["inbound"]
        assert any(c["src"].startswith(f"[{a}]:") and c["actualDst"] == f"[{b}]:{APP_PORT}" for c in inbound)


def test_a_connection_is_listed_while_its_upstream_connects(mesh: Mesh) -> None:
    """ztunnel tracks an outbound connection before it connects upstream (outbound.rs
    ``track_outbound``), so one whose destination does not answer is listed meanwhile."""
    with open_netns(mesh.pods["a"].netns_path) as ns, in_netns(ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with client:
        client.settimeout(10)
        client.connect(("192.0.2.1", 9))  # (accepted at 15001; TEST-NET-1: its upstream connect waits)
        src = f"{mesh.pods['a'].ipv4}:{client.getsockname()[1]}"

        def mine() -> list[dict[str, Any]]:
            listed = mesh.ztunnel.config_dump()["workloadState"][mesh.uid("a")]["connections"]["outbound"]
            return [c for c in listed if c["src"] == src]

        wait_until(lambda: bool(mine()), what="the connection listed (once ztunnel has accepted it)")
        assert mine() == [
            {"src": src, "originalDst": "192.0.2.1:9", "actualDst": "192.0.2.1:9", "protocol": "TCP"}
        ]


def test_dns_from_an_enrolled_pod_is_answered_through_the_forwarder(mesh: Mesh) -> None:
    """The rules send the pod's DNS (UDP and TCP 53) to 15053; zds forwards each query to
    the node's resolver and the answer comes back as if from the server the pod asked."""
    query = b"\x12\x34 a dns query"
    with open_netns(mesh.pods["a"].netns_path) as ns, in_netns(ns):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        udp.settimeout(10)
        udp.sendto(query, ("192.0.2.53", 53))  # a resolver address nobody serves
        answer, source = udp.recvfrom(65535)
    assert answer == b"answer:" + query
    assert source == ("192.0.2.53", 53)  # conntrack undoes the redirect on the reply
    with open_netns(mesh.pods["a"].netns_path) as ns, in_netns(ns):
        udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with udp6:
        udp6.settimeout(10)
        udp6.sendto(b"v6 query", ("2001:db8::53", 53))
        answer6, source6 = udp6.recvfrom(65535)
    assert answer6 == b"answer:v6 query" and source6[:2] == ("2001:db8::53", 53)
    # TCP: each message whole, answered in turn on the same connection.
    asked = dns_framed(b"tcp query") + dns_framed(b"and another")
    answered = dns_framed(b"answer:tcp query") + dns_framed(b"answer:and another")
    assert exchange_from(mesh.pods["a"].netns_path, "192.0.2.53", 53, asked) == answered
    assert query in mesh.resolver.queries and b"tcp query" in mesh.resolver.queries
    dns = mesh.ztunnel.config_dump()["workloadState"][mesh.uid("a")]["dns"]
    assert dns["connections"] >= 3 and dns["failed"] == 0


@pytest.mark.parametrize("trickle", [False, True])
def test_a_tcp_dns_connection_whose_query_does_not_come_whole_in_5s_is_closed(
    mesh: Mesh, trickle: bool
) -> None:
    # ztunnel's DNS server gives a TCP connection 5 s for each request
    # (DEFAULT_TCP_REQUEST_TIMEOUT); zds held an idle one, and its resolver connection, for
    # good, and one that sent a byte now and then (each byte started the 5 s again).
    with open_netns(mesh.pods["a"].netns_path) as ns, in_netns(ns):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with tcp:
        tcp.settimeout(30)
        tcp.connect(("192.0.2.53", 53))
        if trickle:  # a message of 100 bytes, a byte every second: never whole in 5 s
            started = time.monotonic()
            tcp.sendall(b"\x00\x64")
            with contextlib.suppress(OSError):  # (until the forwarder has closed it)
                while time.monotonic() - started < 20:
                    tcp.sendall(b"x")
                    time.sleep(1)
            assert time.monotonic() - started < 20, "a byte a second kept it open"
        with contextlib.suppress(ConnectionResetError):  # (closed with bytes unread: a reset)
            assert tcp.recv(100) == b""  # closed by the forwarder (a timeout here: never)


def test_after_removal_traffic_to_the_pod_goes_direct_and_its_rules_are_gone(mesh: Mesh) -> None:
    c, e = mesh.pods["c"], mesh.pods["e"]
    before = mesh.connections("e", "inbound")
    assert exchange_from(c.netns_path, e.ipv4, APP_PORT, b"via ztunnel\n") == b"via ztunnel\n"
    wait_until(lambda: mesh.connections("e", "inbound") == before + 1, what="E's inbound counter")
    assert any('uid="uid-e"' in series for series in mesh.ztunnel.metrics())
    assert mesh.istio_rules("e"), f"E's {mesh.backend} rules are in before the removal"
    mesh.server.remove_pod(mesh.uid("e"))
    wait_until(
        lambda: mesh.uid("e") not in mesh.ztunnel.config_dump()["workloadState"], what="E gone from ztunnel"
    )
    assert mesh.istio_rules("e") == []
    peers_before = len(mesh.apps["e"].peers)
    assert exchange_from(c.netns_path, e.ipv4, APP_PORT, b"direct\n") == b"direct\n"
    assert mesh.apps["e"].peers[peers_before:] == [c.ipv4]
    assert mesh.counters("e", "inbound") == {}
    # A removed workload's per-uid series go too (no unbounded growth with pod churn).
    wait_until(
        lambda: not any('uid="uid-e"' in series for series in mesh.ztunnel.metrics()),
        what="E's metrics to go",
    )


def test_listeners_gone_means_refused_proving_interception(mesh: Mesh, tmp_path: Any) -> None:
    """Rules without listeners: a connection is refused at once (that is how interception
    shows). Enroll C with a second node agent that has no ztunnel: rules in, no listeners."""
    lonely = NodeAgentProc(str(tmp_path), "--redirect-backend", mesh.backend, redirect=True, name="lonely")
    try:
        lonely.wait_ready()
        with pytest.raises(grpc.RpcError) as info:
            lonely.add_pod("uid-c-lonely", mesh.pods["c"].netns_path)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # no ztunnel, but the rules are in
        with pytest.raises(ConnectionRefusedError):
            exchange_from(mesh.pods["c"].netns_path, mesh.pods["d"].ipv4, APP_PORT, b"x")
        lonely.remove_pod("uid-c-lonely")
        assert exchange_from(mesh.pods["c"].netns_path, mesh.pods["d"].ipv4, APP_PORT, b"x") == b"x"
    finally:
        lonely.stop()


def dropped(netns_path: str, address: str, port: int) -> bool:
    """The connection is accepted and then closed without an answer (EOF or reset)."""
    try:
        return exchange_from(netns_path, address, port, b"loop?") == b""
    except ConnectionResetError:
        return True


def test_direct_connections_to_ztunnels_ports_are_dropped_not_looped(mesh: Mesh) -> None:
    """A connection to B:15006 itself (or to 127.0.0.1:15001 inside A) was not redirected:
    relaying it would dial the same listener again and again. It is dropped, and the
    ztunnel process's fd count stays put."""
    fds_before = fd_count(mesh.ztunnel.pid)
    in_failed = mesh.counters("b", "inbound")["failed"]
    out_failed = mesh.counters("a", "outbound")["failed"]
    assert dropped(mesh.pods["c"].netns_path, mesh.pods["b"].ipv4, 15006)
    assert dropped(mesh.pods["a"].netns_path, "127.0.0.1", 15001)
    wait_until(lambda: mesh.counters("b", "inbound")["failed"] == in_failed + 1, what="B's inbound drop")
    wait_until(lambda: mesh.counters("a", "outbound")["failed"] == out_failed + 1, what="A's outbound drop")
    assert fd_count(mesh.ztunnel.pid) <= fds_before + 2


def test_the_dns_forwarder_is_not_an_open_resolver_on_the_pods_address(mesh: Mesh) -> None:
    """15053 listens on the pod's loopback only (as ztunnel's in-pod DNS): another pod
    cannot use it to reach the node's resolvers."""
    asked = len(mesh.resolver.queries)
    with open_netns(mesh.pods["c"].netns_path) as ns, in_netns(ns):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        udp.settimeout(1.0)
        udp.sendto(b"open resolver?", (mesh.pods["b"].ipv4, 15053))
        with pytest.raises((TimeoutError, ConnectionRefusedError)):
            udp.recvfrom(65535)
    # TCP to B:15053 is redirected to B's 15006 like any inbound TCP, and dropped there
    # (15053 is one of ztunnel's own ports), never forwarded to a resolver.
    assert dropped(mesh.pods["c"].netns_path, mesh.pods["b"].ipv4, 15053)
    assert len(mesh.resolver.queries) == asked


def test_proxied_traffic_is_in_metrics_and_reading_config_dump_makes_no_series(mesh: Mesh) -> None:
    """The relays' counters are /metrics' zds_ztunnel_proxied_* series by uid; a pod without
    traffic has none, also once config_dump was read (reading it made a zero series)."""
    assert exchange_from(mesh.pods["a"].netns_path, mesh.pods["b"].ipv4, APP_PORT, b"ping") == b"ping"
    wait_until(lambda: mesh.counters("b", "inbound")["active"] == 0, what="the inbound relay to finish")
    metrics = mesh.ztunnel.metrics()
    assert metrics['zds_ztunnel_proxied_connections_total{direction="outbound",uid="uid-a"}'] >= 1
    assert metrics['zds_ztunnel_proxied_bytes_total{direction="inbound",flow="received",uid="uid-b"}'] >= 4
    mesh.enroll("c")
    try:
        wait_until(lambda: mesh.uid("c") in mesh.ztunnel.config_dump()["workloadState"], what="C in ztunnel")
        assert mesh.counters("c", "outbound")["connections"] == 0
        assert not [name for name in mesh.ztunnel.metrics() if 'uid="uid-c"' in name]
    finally:
        assert mesh.server.cli("pod", "remove", "--uid", mesh.uid("c")).returncode == 0
