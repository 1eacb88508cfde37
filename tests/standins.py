"""Stand-ins for the other end, for tests of one role alone.

- ztunnel stand-ins facing a node agent (``RawPeer``, ``AckingPeer``, ``Peers``);
- a node-agent stand-in facing ``zds ztunnel`` (``FakeNodeAgent``, ``FakeConnection``).

Each is closed by ``close()`` (the fixtures call it, also on failure).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from collections.abc import Sequence

from tests.harness import wait_until
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    Request,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    decode_request,
    encode_ack,
    encode_hello,
    encode_request,
    request_kind,
)
from zds.protocol.records import Record

# -- ztunnel stand-ins (they face a node agent) -----------------------------------------


def request_of(record: Record) -> Request:
    """The request a node agent sent in ``record``."""
    return decode_request(record.payload)


class RawPeer:
    """A ztunnel stand-in made of a bare SOCK_SEQPACKET socket (blocking calls, with timeouts)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(path)

    def send(self, payload: bytes) -> None:
        self.sock.send(payload)

    def hello(self) -> None:
        self.send(encode_hello())

    def ack(self, error: str = "") -> None:
        self.send(encode_ack(Ack(error=error)))

    def recv(self, timeout: float = 10.0) -> Record | None:
        """The next record, or None if nothing arrives within ``timeout``."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data, fds, flags, _ = socket.recv_fds(self.sock, 1024, 4, socket.MSG_CMSG_CLOEXEC)
        return Record(payload=data, fds=list(fds), flags=flags)

    def expect(self, timeout: float = 10.0) -> Record:
        got = self.recv(timeout)
        assert got is not None, f"nothing received within {timeout}s"
        assert got.payload, "connection closed by the node agent"
        return got

    def expect_closed(self, timeout: float = 10.0) -> None:
        """The node agent closes the connection (EOF) within ``timeout``."""
        got = self.recv(timeout)
        assert got is not None, f"connection still open after {timeout}s"
        got.close_fds()
        assert got.payload == b"", f"expected EOF, got {got.payload.hex()}"

    def take_snapshot(self) -> list[Record]:
        """Ack every snapshot entry and the SnapshotSent; return the entries (fds still open)."""
        entries: list[Record] = []
        while True:
            got = self.expect()
            self.ack()
            if got.payload == bytes.fromhex("1a00"):
                return entries
            entries.append(got)

    def close(self) -> None:
        self.sock.close()


class AckingPeer:
    """A ztunnel stand-in that says hello and answers every request from a thread.

    ``nack`` maps a uid to the error its AddWorkload is answered with; ``received``
    lists every request in order (``kinds`` their oneof names).
    """

    def __init__(self, path: str, nack: dict[str, str] | None = None, delay: float = 0.0) -> None:
        self.raw = RawPeer(path)
        self.nack = nack or {}
        #: Seconds to wait before each ack (a slow ztunnel).
        self.delay = delay
        self.received: list[Request] = []
        self._stop = threading.Event()
        self.raw.hello()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def kinds(self) -> list[str]:
        return [request_kind(r) for r in list(self.received)]

    def wait_snapshot(self) -> None:
        """Wait until the node agent's snapshot has been answered."""
        wait_until(lambda: "snapshot_sent" in self.kinds, "the snapshot")

    def _run(self) -> None:
        while not self._stop.is_set():
            # The timeout only lets close() stop the thread; nothing waits on it.
            try:
                got = self.raw.recv(timeout=0.1)
            except ConnectionResetError:
                return  # a node agent killed with a record unread: gone, as at EOF
            if got is None:
                continue
            got.close_fds()
            if not got.payload:
                return
            request = request_of(got)
            self.received.append(request)
            # Being slow is the point (a slow ztunnel), not synchronisation; close() cuts it short
            # (a thread still asleep when its socket was closed acked on a closed fd, or another's).
            if self.delay and self._stop.wait(self.delay):
                return
            try:
                self.raw.ack(self.nack.get(request.uid, "") if isinstance(request, AddWorkload) else "")
            except (BrokenPipeError, ConnectionResetError):
                return  # a node agent stopped before it read the answer: gone, as at EOF

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.raw.close()


class Peers:
    """The ztunnel stand-ins one test opened; the ``peers`` fixture closes every one
    (closing one twice is harmless, so a test may close one early)."""

    def __init__(self) -> None:
        self._opened: list[RawPeer | AckingPeer] = []

    def raw(self, zds_socket: str) -> RawPeer:
        peer = RawPeer(zds_socket)
        self._opened.append(peer)
        return peer

    def acking(self, zds_socket: str, nack: dict[str, str] | None = None, delay: float = 0.0) -> AckingPeer:
        peer = AckingPeer(zds_socket, nack, delay)
        self._opened.append(peer)
        return peer

    def close(self) -> None:
        for peer in self._opened:
            peer.close()


# -- a node-agent stand-in (it faces zds ztunnel) -----------------------------------------


class FakeConnection:
    """One accepted ztunnel connection, driven record by record."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, timeout: float = 10.0) -> bytes:
        """The next record (b"" when ztunnel closed the connection)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096)
        except ConnectionResetError:
            return b""

    def hello(self) -> None:
        assert self.recv() == b"\x08\x01", "ztunnel's first record must be ZdsHello{V1}"

    def send(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [payload], list(fds))
        else:
            self.sock.send(payload)

    def request(self, request: Request | bytes, fds: Sequence[int] = ()) -> Ack:
        """Send one request (with fds), return ztunnel's ack."""
        payload = request if isinstance(request, bytes) else encode_request(request)
        self.send(payload, fds)
        reply = self.recv()
        assert reply, "ztunnel closed the connection instead of answering"
        return decode_ack(reply)

    def add(self, uid: str, netns: str, info: WorkloadInfo | None = None) -> Ack:
        """AddWorkload for ``uid`` with an fd of ``netns`` (a path)."""
        info = info or WorkloadInfo(name=f"pod-{uid}", namespace="default", service_account="default")
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.request(AddWorkload(uid=uid, info=info), [fd])
        finally:
            os.close(fd)

    def snapshot(self) -> Ack:
        return self.request(SnapshotSent())

    def delete(self, uid: str) -> Ack:
        return self.request(DelWorkload(uid=uid))

    def expect_closed(self, timeout: float = 10.0) -> None:
        record = self.recv(timeout)
        assert record == b"", f"expected ztunnel to close the connection, got {record!r}"

    def close(self) -> None:
        self.sock.close()


class FakeNodeAgent:
    """A SOCK_SEQPACKET listener at ``path`` that hands out FakeConnections.

    A raw listener driven from the test, so it can send what a well-behaved node
    agent never would (bad records, protocol errors).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns: list[FakeConnection] = []

    def accept(self, timeout: float = 15.0) -> FakeConnection:
        self.sock.settimeout(timeout)
        sock, _ = self.sock.accept()
        conn = FakeConnection(sock)
        self.conns.append(conn)
        return conn

    def connect_and_hello(self, timeout: float = 15.0) -> FakeConnection:
        conn = self.accept(timeout)
        conn.hello()
        return conn

    def close(self) -> None:
        """Stop listening first (so ztunnel cannot reconnect meanwhile), then hang up."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for conn in self.conns:
            conn.close()
