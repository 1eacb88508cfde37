"""The ztunnel side's bounds on what one connection or one pod can hold (client/datapath.py,
client/dns.py), in-process over loopback: a relay's connect that a cancel meets as it
completes, the relay's idle deadline, a pod's UDP DNS queries in flight, the relay socket
options ztunnel sets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator

import pytest

from tests.harness import async_wait_until, open_fds
from zds.client import datapath, dns
from zds.client.datapath import DirectionStats, connect_within, relay, tune_relay_socket
from zds.client.dns import MAX_UDP_IN_FLIGHT, DnsProxy
from zds.client.inpod import DnsSockets
from zds.client.listeners import SocketWatcher


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


async def test_a_cancel_that_comes_as_the_connect_completes_is_a_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Python 3.11's asyncio.wait_for returned the connect's result here and the relay went
    # on past its workload's removal (whose cancel it had swallowed), for good.
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[None] = loop.create_future()
    monkeypatch.setattr(loop, "sock_connect", lambda sock, address: connected)
    with socket.socket() as sock:
        task = asyncio.create_task(connect_within(sock, ("127.0.0.1", 9), 5.0))
        await asyncio.sleep(0)  # the task now waits for the connect
        connected.set_result(None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_connect_that_takes_too_long_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "sock_connect", lambda sock, address: loop.create_future())
    with socket.socket() as sock, pytest.raises(TimeoutError):
        await connect_within(sock, ("127.0.0.1", 9), 0.05)


async def relay_sockets(listener: socket.socket) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(the far end of the client, the relay's client socket, the relay's upstream socket
    connected to ``listener``), all non-blocking."""
    client_far, client = socket.socketpair()
    upstream = socket.socket()
    upstream.setblocking(False)
    await asyncio.get_running_loop().sock_connect(upstream, listener.getsockname())
    client.setblocking(False)
    client_far.setblocking(False)
    return client_far, client, upstream


#: The relays' idle deadline in the test below: the busy one gets a byte every 0.1 s, so only a
#: stall of the event loop of several seconds could make it look idle.
IDLE = 3.0


async def test_an_idle_relay_is_closed_and_a_busy_one_is_not(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="zds.ztunnel.datapath")
    loop = asyncio.get_running_loop()
    idle_far, idle_client, idle_upstream = await relay_sockets(listener)
    busy_far, busy_client, busy_upstream = await relay_sockets(listener)
    busy_stats = DirectionStats()
    busy_relay = asyncio.create_task(relay(busy_client, busy_upstream, busy_stats, idle=IDLE))
    idle_relay: asyncio.Task[None] | None = None
    try:
        await loop.sock_sendall(busy_far, b"x")
        await async_wait_until(lambda: busy_stats.bytes_sent == 1, "the busy relay's first byte")
        # Started after it: were the busy one's deadline not pushed on by its bytes, it would end first.
        idle_relay = asyncio.create_task(relay(idle_client, idle_upstream, DirectionStats(), idle=IDLE))
        sent = 1
        for _ in range(int((IDLE + 30) / 0.1)):  # (the bound only ends a hung test)
            await loop.sock_sendall(busy_far, b"x")  # a byte every 0.1 s: never idle for IDLE s
            sent += 1
            await asyncio.wait([idle_relay], timeout=0.1)
            if idle_relay.done():
                break
        assert idle_relay.done(), "the idle relay never ended"
        assert idle_relay.result() is None  # (it ended by itself)
        assert await asyncio.wait_for(loop.sock_recv(idle_far, 10), 5) == b""  # EOF to the client
        assert caplog.text.count(f"relay idle for {IDLE:g} s: closed") == 1  # that one only
        assert not busy_relay.done()
        await async_wait_until(lambda: busy_stats.bytes_sent == sent, "every byte through the busy relay")
    finally:
        busy_relay.cancel()
        await asyncio.gather(busy_relay, *([idle_relay] if idle_relay else []), return_exceptions=True)
        for sock in (idle_far, busy_far):
            sock.close()
        if idle_relay is None:  # (never handed to a relay, which closes its own)
            idle_client.close()
            idle_upstream.close()
        while (accepted := _accept_now(listener)) is not None:
            accepted.close()


def _accept_now(listener: socket.socket) -> socket.socket | None:
    listener.setblocking(False)
    try:
        return listener.accept()[0]
    except BlockingIOError:
        return None


async def test_a_pod_flooding_its_dns_holds_at_most_its_share_of_sockets() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a resolver that never answers
    silent.bind(("127.0.0.1", 0))
    pod_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pod_side.bind(("127.0.0.1", 0))
    pod_side.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    watcher = SocketWatcher()
    proxy = DnsProxy(DnsSockets(udp=[pod_side], tcp=[]), resolvers=[silent.getsockname()])
    flood = MAX_UDP_IN_FLIGHT + 100
    before = len(open_fds())  # (not gRPC's eventfds: its threads replace them at any moment)
    try:
        proxy.start_udp(watcher)

        def read(count: int) -> Callable[[], bool]:
            return lambda: proxy.stats.connections >= count

        for i in range(flood):
            sender.sendto(b"query %d" % i, pod_side.getsockname())
            if i % 16 == 15:  # (the forwarder reads them before more come: no datagram dropped)
                await async_wait_until(read(i + 1), f"query {i} read")
        await async_wait_until(lambda: proxy.stats.connections >= flood, "every query read")
        assert proxy.stats.connections == flood
        assert proxy.stats.failed == flood - MAX_UDP_IN_FLIGHT  # each over the bound, dropped
        assert len(open_fds()) - before <= MAX_UDP_IN_FLIGHT  # one socket per query in flight
    finally:
        proxy.close()  # (closes pod_side too)
        silent.close()
        sender.close()
    # every query's socket closed (and pod_side; silent and sender were opened before `before`)
    await async_wait_until(lambda: len(open_fds()) <= before - 3, "every query's socket closed")


def test_both_sockets_of_a_relay_get_ztunnels_options() -> None:
    with socket.socket() as sock:
        tune_relay_socket(sock)
        got = {
            "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "probes": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        }
    # ztunnel's SocketConfig defaults (src/config.rs): keepalive 180 s, 180 s apart, 9 probes.
    assert got == {"nodelay": 1, "keepalive": 1, "idle": 180, "interval": 180, "probes": 9}


async def test_a_query_the_process_has_no_fd_for_goes_unanswered_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_fd_left(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_fd_left)  # (what zds.client.dns calls)
    with caplog.at_level(logging.DEBUG, logger="zds.ztunnel.dns"):
        assert await dns.forward_udp(b"query", [("127.0.0.1", 53), ("127.0.0.2", 53)]) is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]  # one per resolver


async def test_a_relay_whose_peer_timed_out_ends_as_one_reset_does(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket
) -> None:
    # What keepalive finds when nothing answers its probes: the read fails with ETIMEDOUT,
    # which is no ConnectionError; it escaped the relay as a handler failure with a traceback.
    async def timed_out(*args: object) -> None:
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(datapath, "_pump", timed_out)
    client_far, client, upstream = await relay_sockets(listener)
    with client_far:
        await relay(client, upstream, DirectionStats())  # returns: no exception
    assert client.fileno() == -1 and upstream.fileno() == -1  # both closed by the relay


async def test_connections_into_pods_past_the_data_paths_fd_reserve_are_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pod's connections (a relay holds two fds) took every fd of the process, the ones
    kept for other pods' sockets too: those pods were nacked, and stayed broken. Past the
    data path's reserve a connection is closed as it is accepted, said in one line."""
    from zds.client import listeners
    from zds.client.inpod import InpodListener, ListenerSpec

    held: list[listeners.AcceptedConnection] = []
    forever = asyncio.Event()

    async def hold(conn: listeners.AcceptedConnection) -> None:
        held.append(conn)
        await forever.wait()

    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    watcher = SocketWatcher()
    server = listeners.ListenerServer(InpodListener(ListenerSpec("outbound", 0), sock, "test"), hold)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(10)]
    # As if the limit left 5 fds above the next free one (fds are numbered from the lowest free up).
    probe = os.dup(0)
    os.close(probe)
    monkeypatch.setattr(listeners, "_data_path_ceiling", lambda: probe + 5)
    try:
        server.start(watcher)
        await async_wait_until(lambda: server.accepted + server.refused == 10, "the 10 accepted or refused")
        assert (server.accepted, server.refused) == (5, 5) and len(held) == 5
        assert all(conn.sock.fileno() < probe + 5 for conn in held)
        listeners.flush_refusals()  # (the first said at once, the rest in a line every 10 s)
        said = [r.getMessage() for r in caplog.records if "into pods" in r.getMessage()]
        counts = [
            re.findall(r"^refused (\d+) connection\(s\) into pods: fewer than 128 fds free", line)
            for line in said
        ]
        assert all(len(count) == 1 for count in counts), said
        assert sum(int(count[0]) for count in counts) == 5 and len(said) <= 2, said
    finally:
        forever.set()
        await server.wait_connections()  # (each closes its socket)
        server.close()
        watcher.close()
        for client in clients:
            client.close()


async def test_a_relay_cut_short_while_its_destination_does_not_read_lets_its_sockets_go(
    listener: socket.socket,
) -> None:
    """A relay cancelled (its pod removed) while the destination read nothing waited in its
    close for the buffered bytes to go out, for good: its task, sockets and buffers stayed
    until the process ended. Now it cuts them, and one that ended itself waits a bounded time."""
    loop = asyncio.get_running_loop()
    far, client, upstream = await relay_sockets(listener)
    accepted = None
    stats = DirectionStats()
    task = asyncio.create_task(relay(client, upstream, stats))
    try:
        accepted = await loop.run_in_executor(None, listener.accept)  # (the destination: never reads)
        chunk = b"x" * 65536
        with contextlib.suppress(TimeoutError):  # write until everything between is full
            async with asyncio.timeout(2):
                while True:
                    await loop.sock_sendall(far, chunk)
        assert stats.bytes_sent > 0
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, "the cancelled relay is still closing its sockets"
        assert client.fileno() == -1 and upstream.fileno() == -1
    finally:
        if not task.done():
            task.cancel()
        far.close()
        if accepted is not None:
            accepted[0].close()


async def test_a_listener_taken_out_of_listen_under_the_side_is_given_up_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pod's listener shut down by something else in its netns (`ss -K`, a shutdown) stays
    readable while accept fails with EINVAL: the watcher called it again at every turn of the
    loop, ~60,000 error lines a second at 100% CPU, every other pod slowed, until the pod went."""
    from zds.client import listeners
    from zds.client.inpod import InpodListener, ListenerSpec

    async def never(conn: listeners.AcceptedConnection) -> None:
        raise AssertionError("nothing connects")

    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    watcher = SocketWatcher()
    server = listeners.ListenerServer(InpodListener(ListenerSpec("outbound", 0), sock, "test"), never)
    try:
        server.start(watcher)
        sock.shutdown(socket.SHUT_RDWR)  # (out of LISTEN, still open: what `ss -K` leaves)
        for _ in range(200):  # turns of the loop, in each of which a watched listener is served
            await asyncio.sleep(0)
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("accept on")]
        assert len(said) == 1 and said[0].endswith("Invalid argument; no longer accepting there"), said[:3]
    finally:
        server.close()
        watcher.close()
        sock.close()


async def test_a_stopped_proxy_is_freed_without_the_collector() -> None:
    """A proxy and its listeners' servers pointed at each other (each server's ``owner``):
    a stopped pod's proxy, its listeners and their buffers waited for a full collection
    (443 proxies alive beside 41 pods in a soak). Stopped, it goes when the last reference does."""
    import gc
    import weakref

    from zds.client.inpod import InpodListener, ListenerSpec
    from zds.client.workloads import WorkloadProxy
    from zds.protocol.messages import WorkloadInfo

    async def close_at_once(conn: object) -> None:
        return None

    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    watcher = SocketWatcher()
    proxy = WorkloadProxy(
        "u1", WorkloadInfo("p1", "ns", "sa"), [InpodListener(ListenerSpec("outbound", 0), sock, "t")]
    )
    proxy.serve({"outbound": close_at_once}, watcher, [])
    gone, server = weakref.ref(proxy), weakref.ref(proxy.servers[0])
    with socket.create_connection(sock.getsockname()):
        await async_wait_until(lambda: getattr(server(), "accepted", 0) == 1, "the connection accepted")
    await proxy.wait_connections()
    gc.disable()
    try:
        proxy.close()
        del proxy
        assert gone() is None and server() is None
    finally:
        gc.enable()
        watcher.close()
        sock.close()
