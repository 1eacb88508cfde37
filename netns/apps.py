"""Applications for pod fixtures: a TCP echo server inside a pod, a client that connects
from inside a pod, and a free port on the node's loopback for a process to listen on. Used
by ``zds demo``, ``zds check``, the compose ``pods`` service and tests."""

from __future__ import annotations

import contextlib
import socket
import threading

from .enter import in_netns
from .handle import open_netns


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoServer:
    """A TCP echo server whose listening socket lives in a pod's netns (dual-stack ``[::]``).

    One thread per connection; ``peers`` records the client address of each connection
    (IPv4 clients without their ``::ffff:`` prefix). ``close()`` stops it.
    """

    def __init__(self, netns_path: str, port: int) -> None:
        with open_netns(netns_path) as ns, in_netns(ns):
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("::", port))
            self.sock.listen(128)
            self.sock.settimeout(0.2)
        except BaseException:
            self.sock.close()
            raise
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name=f"echo:{port}", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # (out of fds: it would fail again at once, spinning)
                self._stop.wait(0.1)
                continue
            self.peers.append(str(addr[0]).removeprefix("::ffff:"))
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)
        self.sock.close()


def exchange(netns_path: str, address: str, port: int, payload: bytes, timeout: float = 30) -> bytes:
    """Connect from inside a netns to ``address:port``, send ``payload`` and half-close while
    reading the answer to EOF (both at once, so large payloads cannot deadlock)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with open_netns(netns_path) as ns, in_netns(ns):
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        sock.settimeout(timeout)
        sock.connect((address, port))

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        sender.join(timeout)
    return b"".join(chunks)
